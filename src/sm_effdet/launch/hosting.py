"""`sm-effdet deploy` and `sm-effdet transform`: a training job's model.tar.gz served by the
same image, as a real-time endpoint or a Batch Transform job (README, "What serve does")."""

from __future__ import annotations

import argparse
import contextlib
import json
import struct
import sys
import time
import zlib
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from ..errors import UserInputError, shorten
from .upload import split_s3
from .validation import check_request

NAME_LIMIT = 63  # models, endpoint configs, endpoints and transform jobs
DEFAULT_INSTANCE_TYPE = "ml.m5.xlarge"
# serve's content types for one raw image (README, "What serve does").
IMAGE_CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}
ANSWER_LIMIT = 4000  # characters of the endpoint's answer printed


def _stamp(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).strftime("%Y%m%d-%H%M%S")


def resource_name(base: str, suffix: str) -> str:
    """`base-suffix` within SageMaker's 63 characters, `base` shortened when needed."""
    room = NAME_LIMIT - len(suffix) - 1
    return f"{base[:room].rstrip('-')}-{suffix}"


def parse_env(pairs: list[str] | None) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserInputError(
                f"--env {shorten(pair, 60)!r} is not KEY=VALUE; write it as, for example, "
                "--env SERVE_SCORE_THRESHOLD=0.5."
            )
        env[key.strip()] = value
    return env


# --- Where the model comes from ---------------------------------------------------------


def model_source(sagemaker, s3, source: str) -> dict[str, Any]:
    """ModelDataUrl (checked to exist), and the training job's image and role when `source`
    is a job name rather than a model.tar.gz URI."""
    if source.startswith("s3://"):
        found = {"ModelDataUrl": source, "TrainingImage": None, "RoleArn": None, "JobName": None}
    else:
        job = sagemaker.describe_training_job(TrainingJobName=source)
        status = job["TrainingJobStatus"]
        if status != "Completed":
            raise UserInputError(
                f"training job {source} is {status}, not Completed, so it has no model to "
                f"deploy; wait for it (sm-effdet logs {source}) or give a model.tar.gz S3 URI."
            )
        found = {
            "ModelDataUrl": job["ModelArtifacts"]["S3ModelArtifacts"],
            "TrainingImage": job["AlgorithmSpecification"].get("TrainingImage"),
            "RoleArn": job.get("RoleArn"),
            "JobName": source,
        }
    uri = found["ModelDataUrl"]
    if not uri.endswith(".tar.gz"):
        raise UserInputError(
            f"{shorten(uri, 200)} is not a model.tar.gz; give the S3 URI of a training job's "
            "model.tar.gz, or the job's name."
        )
    _check_object(s3, uri)
    return found


def _check_object(s3, uri: str) -> None:
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    try:
        s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NoSuchBucket"):
            raise UserInputError(
                f"{shorten(uri, 200)} does not exist; check the URI (a training job's model is "
                "at <output path>/<job>/output/model.tar.gz)."
            ) from None
        raise


# --- The requests -----------------------------------------------------------------------


def model_request(
    name: str,
    *,
    image: str,
    model_data: str,
    role: str,
    environment: Mapping[str, str] | None = None,
) -> dict:
    container: dict[str, Any] = {"Image": image, "ModelDataUrl": model_data}
    if environment:
        container["Environment"] = dict(environment)
    request = {"ModelName": name, "PrimaryContainer": container, "ExecutionRoleArn": role}
    check_request("CreateModel", request)
    return request


def endpoint_config_request(
    name: str, *, model_name: str, instance_type: str, instance_count: int
) -> dict:
    request = {
        "EndpointConfigName": name,
        "ProductionVariants": [
            {
                "VariantName": "AllTraffic",
                "ModelName": model_name,
                "InstanceType": instance_type,
                "InitialInstanceCount": instance_count,
            }
        ],
    }
    check_request("CreateEndpointConfig", request)
    return request


def endpoint_request(name: str, config_name: str) -> dict:
    request = {"EndpointName": name, "EndpointConfigName": config_name}
    check_request("CreateEndpoint", request)
    return request


def update_endpoint_request(name: str, config_name: str) -> dict:
    request = {"EndpointName": name, "EndpointConfigName": config_name}
    check_request("UpdateEndpoint", request)
    return request


def invoke_request(endpoint: str, body: bytes, content_type: str) -> dict:
    request = {
        "EndpointName": endpoint,
        "ContentType": content_type,
        "Accept": "application/json",
        "Body": body,
    }
    check_request("InvokeEndpoint", request, service="sagemaker-runtime")
    return request


def transform_request(
    name: str,
    *,
    model_name: str,
    input_uri: str,
    output_uri: str,
    content_type: str = "image/jpeg",
    accept: str = "application/json",
    instance_type: str = DEFAULT_INSTANCE_TYPE,
    instance_count: int = 1,
    environment: Mapping[str, str] | None = None,
) -> dict:
    # One image per S3 object is one request; JSON Lines are split per line and batched
    # (serve's application/jsonlines), their answers joined line by line.
    lines = content_type == "application/jsonlines"
    request: dict[str, Any] = {
        "TransformJobName": name,
        "ModelName": model_name,
        "TransformInput": {
            "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": input_uri}},
            "ContentType": content_type,
            "SplitType": "Line" if lines else "None",
        },
        "TransformOutput": {"S3OutputPath": output_uri, "Accept": accept},
        "TransformResources": {"InstanceType": instance_type, "InstanceCount": instance_count},
    }
    if lines:
        request["BatchStrategy"] = "MultiRecord"
        request["TransformOutput"]["AssembleWith"] = "Line"
    if environment:
        request["Environment"] = dict(environment)
    check_request("CreateTransformJob", request)
    return request


# --- Waiting ----------------------------------------------------------------------------


def wait_for(
    describe,
    status_key: str,
    *,
    done: str,
    out: TextIO,
    poll_seconds: float,
    timeout_seconds: float,
    sleep=time.sleep,
    clock=time.monotonic,
) -> dict:
    """Poll `describe()` until `status_key` is `done` or Failed/Stopped, printing each change
    with the time since the start; a bound of its own (the waiters give up after their own)."""
    start = clock()
    last = None
    while True:
        description = describe()
        status = description[status_key]
        if status != last:
            elapsed = int(clock() - start)
            print(f"  {elapsed // 60:02d}:{elapsed % 60:02d}  {status}", file=out, flush=True)
            last = status
        if status == done or status in ("Failed", "Stopped", "OutOfService"):
            return description
        if clock() - start > timeout_seconds:
            return description
        sleep(poll_seconds)


def _interruptible(goes_on: str, *args, **kwargs) -> dict | None:
    """wait_for, where Ctrl-C stops waiting (not the resource) and says how to look at it."""
    try:
        return wait_for(*args, **kwargs)
    except KeyboardInterrupt:
        print(f"\nStopped waiting; the {goes_on}", file=kwargs["out"])
        return None


def _ended(
    description: Mapping[str, Any], status_key: str, done: str, what: str, minutes: float
) -> str | None:
    """None when `done`, else the one sentence why not."""
    status = description[status_key]
    if status == done:
        return None
    if status in ("Failed", "Stopped", "OutOfService"):
        reason = description.get("FailureReason") or "SageMaker gave no FailureReason"
        return f"{what} is {status}: {reason.rstrip('.')}."
    return f"{what} is still {status} after {minutes:g} minutes; it goes on: check it again later."


# --- Sending an image -------------------------------------------------------------------


def _wait_until(
    args, what: str, describe, status_key: str, done: str, goes_on: str, *, out: TextIO, sleep
) -> int | None:
    """Poll until `done`: None then, else the exit code (130 on Ctrl-C, 1 when it ended in
    another status or the wait ran out, with one sentence on stderr)."""
    description = _interruptible(
        goes_on, describe, status_key, done=done, out=out, poll_seconds=args.poll_seconds,
        timeout_seconds=args.wait_minutes * 60, sleep=sleep,
    )
    if description is None:
        return 130
    problem = _ended(description, status_key, done, what, args.wait_minutes)
    if problem:
        print(f"sm-effdet: {problem}", file=sys.stderr)
        return 1
    return None


def generated_png(size: int = 256) -> bytes:
    """A grey image with three coloured boxes (PNG, standard library only: the launcher has no
    Pillow), enough for serve to decode and predict on."""
    boxes = [
        ((40, 40, 120, 140), (200, 40, 40)),
        ((140, 60, 220, 120), (40, 160, 60)),
        ((90, 160, 200, 230), (40, 60, 200)),
    ]
    rows = []
    for y in range(size):
        row = bytearray(b"\x00")  # filter type None
        for x in range(size):
            colour = (128, 128, 128)
            for (x0, y0, x1, y1), fill in boxes:
                if x0 <= x < x1 and y0 <= y < y1:
                    colour = fill
            row.extend(colour)
        rows.append(bytes(row))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"".join(rows)))
        + chunk(b"IEND", b"")
    )


def sample_image(path: Path | None) -> tuple[bytes, str, str]:
    """The body, its content type and how to name it in the output."""
    if path is None:
        return generated_png(), "image/png", "a generated 256x256 image"
    content_type = IMAGE_CONTENT_TYPES.get(path.suffix.lower(), "application/x-image")
    try:
        return path.read_bytes(), content_type, str(path)
    except OSError as exc:
        raise UserInputError(f"cannot read the --sample image {path}: {exc.strerror}.") from None


def invoke(runtime, endpoint: str, body: bytes, content_type: str, label: str, out: TextIO) -> bool:
    """Send one image and print the answer; False when the container refused it."""
    from botocore.exceptions import ClientError

    print(f"InvokeEndpoint {endpoint} with {label} ({content_type}, {len(body)} bytes):", file=out)
    try:
        response = runtime.invoke_endpoint(**invoke_request(endpoint, body, content_type))
    except ClientError as exc:
        error = exc.response.get("Error", {})
        if error.get("Code") != "ModelError":
            raise
        # The endpoint is up; serve answered 4xx/5xx (its {"error": sentence} is in Message).
        print(
            f"sm-effdet: endpoint {endpoint} is InService but answered "
            f"{exc.response.get('OriginalStatusCode', 'an error')}: "
            f"{shorten(error.get('Message', ''), 600)}",
            file=sys.stderr,
        )
        return False
    answer = response["Body"].read().decode("utf-8", errors="replace")
    try:
        answer = json.dumps(json.loads(answer), indent=1)
    except ValueError:
        pass
    if len(answer) > ANSWER_LIMIT:
        answer = answer[:ANSWER_LIMIT] + f"\n... ({len(answer)} characters in all)"
    print(answer, file=out, flush=True)
    return True


# --- deploy -----------------------------------------------------------------------------


def _image_and_role(args, source: Mapping[str, Any]) -> tuple[str, str]:
    image = args.image or source["TrainingImage"]
    role = args.role or source["RoleArn"]
    if not image:
        raise UserInputError(
            "no image for a model given by its S3 URI; pass --image with the URI make push "
            "printed (the image that trained it)."
        )
    if not role:
        raise UserInputError(
            "no execution role for a model given by its S3 URI; pass --role with the ARN of a "
            "role that can read the model and pull the image."
        )
    return image, role


def create_model(sagemaker, args, source: Mapping[str, Any], name: str, out: TextIO) -> str:
    image, role = _image_and_role(args, source)
    request = model_request(
        name,
        image=image,
        model_data=source["ModelDataUrl"],
        role=role,
        environment=parse_env(args.env),
    )
    sagemaker.create_model(**request)
    origin = f" (training job {source['JobName']})" if source["JobName"] else ""
    print(f"CreateModel {name}: {source['ModelDataUrl']}{origin}, image {image}", file=out)
    return name


@contextlib.contextmanager
def _undone_on_error(sagemaker, *, model: str, endpoint_config: str | None = None):
    """A call refused after the model (and config) were created deletes them again, so that a
    failed deploy leaves nothing behind; the refusal itself goes on to the user."""
    from botocore.exceptions import ClientError

    try:
        yield
    except ClientError:
        with contextlib.suppress(ClientError):
            if endpoint_config:
                sagemaker.delete_endpoint_config(EndpointConfigName=endpoint_config)
            sagemaker.delete_model(ModelName=model)
        raise


def _existing_endpoint(sagemaker, name: str) -> dict | None:
    from botocore.exceptions import ClientError

    try:
        return sagemaker.describe_endpoint(EndpointName=name)
    except ClientError as exc:
        error = exc.response.get("Error", {})
        if error.get("Code") == "ValidationException" and "Could not find" in error.get(
            "Message", ""
        ):
            return None
        raise


def deploy(args, *, sagemaker, runtime, s3, out: TextIO = sys.stdout, sleep=time.sleep) -> int:
    parse_env(args.env)  # bad input first, before any call
    source = model_source(sagemaker, s3, args.source)
    _image_and_role(args, source)
    endpoint = args.endpoint_name or source["JobName"] or f"sm-effdet-{_stamp()}"
    existing = _existing_endpoint(sagemaker, endpoint)
    if existing and existing["EndpointStatus"] not in ("InService",):
        raise UserInputError(
            f"endpoint {endpoint} exists and is {existing['EndpointStatus']}; wait until it is "
            "InService to update it (a Failed one must be deleted: aws sagemaker delete-endpoint "
            f"--endpoint-name {endpoint}), or choose another --endpoint-name."
        )
    names = resource_name(endpoint, _stamp())
    config = endpoint_config_request(
        names,
        model_name=names,
        instance_type=args.instance_type,
        instance_count=args.instance_count,
    )
    endpoint_request(endpoint, names)  # checked before the model is created
    create_model(sagemaker, args, source, names, out)
    with _undone_on_error(sagemaker, model=names):
        sagemaker.create_endpoint_config(**config)
    print(f"CreateEndpointConfig {names}: {args.instance_count} x {args.instance_type}", file=out)
    with _undone_on_error(sagemaker, model=names, endpoint_config=names):
        if existing:
            sagemaker.update_endpoint(**update_endpoint_request(endpoint, names))
        else:
            sagemaker.create_endpoint(**endpoint_request(endpoint, names))
    if existing:
        print(
            f"UpdateEndpoint {endpoint}: it exists, so it moves to the new config "
            f"{names} (it serves the old one until the new one is InService).",
            file=out,
        )
    else:
        print(f"CreateEndpoint {endpoint}", file=out)
    if args.no_wait:
        print(
            f"Not waiting; follow it: aws sagemaker describe-endpoint --endpoint-name {endpoint}",
            file=out,
        )
        return 0
    print(
        f"Waiting for {endpoint} to be InService (at most {args.wait_minutes:g} minutes):", file=out
    )
    failed = _wait_until(
        args, f"endpoint {endpoint}", lambda: sagemaker.describe_endpoint(EndpointName=endpoint),
        "EndpointStatus", "InService",
        f"endpoint {endpoint} goes on being created: aws sagemaker describe-endpoint "
        f"--endpoint-name {endpoint}", out=out, sleep=sleep,
    )
    if failed is not None:
        return failed
    body, content_type, label = sample_image(args.sample)
    answered = invoke(runtime, endpoint, body, content_type, label, out)
    print(
        f"Call it: aws sagemaker-runtime invoke-endpoint --endpoint-name {endpoint} "
        "--content-type image/jpeg --body fileb://photo.jpg out.json",
        file=out,
    )
    print(f"Delete it: aws sagemaker delete-endpoint --endpoint-name {endpoint}", file=out)
    return 0 if answered else 1


# --- transform --------------------------------------------------------------------------


def _check_input(s3, uri: str) -> int:
    bucket, prefix = split_s3(uri)
    listing = s3.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1000)
    count = listing.get("KeyCount", 0)
    if not count:
        raise UserInputError(
            f"there are no objects under {shorten(uri, 200)}; upload the images (one per object) "
            "or JSON Lines there first (aws s3 sync FOLDER URI)."
        )
    return count


def transform(args, *, sagemaker, s3, out: TextIO = sys.stdout, sleep=time.sleep) -> int:
    environment = parse_env(args.env)
    if not args.input.startswith("s3://"):
        raise UserInputError(
            f"--input {shorten(args.input, 100)!r} is not an S3 URI; give the s3:// prefix that "
            "holds the images."
        )
    source = model_source(sagemaker, s3, args.source)
    _image_and_role(args, source)
    count = _check_input(s3, args.input)
    name = args.name or resource_name(source["JobName"] or "sm-effdet-transform", _stamp())
    bucket, _ = split_s3(args.input)
    output = args.output or f"s3://{bucket}/sm-effdet/transform/{name}/"
    request = transform_request(
        name,
        model_name=name,
        input_uri=args.input,
        output_uri=output,
        content_type=args.content_type,
        accept=args.accept,
        instance_type=args.instance_type,
        instance_count=args.instance_count,
        environment=environment,
    )
    create_model(sagemaker, args, source, name, out)
    with _undone_on_error(sagemaker, model=name):
        sagemaker.create_transform_job(**request)
    more = "+" if count >= 1000 else ""
    print(
        f"CreateTransformJob {name}: {count}{more} objects under {args.input} "
        f"({args.content_type}) -> {output}",
        file=out,
    )
    if args.no_wait:
        print(
            f"Not waiting; follow it: aws sagemaker describe-transform-job --transform-job-name {name}",
            file=out,
        )
        return 0
    print(f"Waiting for {name} (at most {args.wait_minutes:g} minutes):", file=out)
    failed = _wait_until(
        args, f"transform job {name}",
        lambda: sagemaker.describe_transform_job(TransformJobName=name),
        "TransformJobStatus", "Completed",
        f"transform job {name} goes on: aws sagemaker describe-transform-job "
        f"--transform-job-name {name}", out=out, sleep=sleep,
    )
    if failed is not None:
        return failed
    out_bucket, out_prefix = split_s3(output)
    results = s3.list_objects_v2(Bucket=out_bucket, Prefix=out_prefix).get("Contents", [])
    print(f"Results: {output} ({len(results)} files, one <input object>.out per input)", file=out)
    for item in results[:5]:
        print(f"  s3://{out_bucket}/{item['Key']}", file=out)
    return 0


# --- The commands -----------------------------------------------------------------------


def _model_arguments(parser) -> None:
    parser.add_argument(
        "source",
        metavar="JOB|MODEL_URI",
        help="a Completed training job's name, or the S3 URI of a model.tar.gz",
    )
    parser.add_argument("--image", help="image URI (default: the training job's image)")
    parser.add_argument("--role", help="execution role ARN (default: the training job's role)")
    parser.add_argument(
        "--instance-type", default=DEFAULT_INSTANCE_TYPE, help=f"default {DEFAULT_INSTANCE_TYPE}"
    )
    parser.add_argument("--instance-count", type=int, default=1)
    parser.add_argument(
        "--env",
        action="append",
        metavar="KEY=VALUE",
        help="container environment, repeatable (e.g. SERVE_SCORE_THRESHOLD=0.5)",
    )
    parser.add_argument("--no-wait", action="store_true", help="create and return")
    parser.add_argument("--poll-seconds", type=float, default=30, help=argparse.SUPPRESS)


def add_commands(subparsers) -> None:
    deploy_parser = subparsers.add_parser(
        "deploy",
        help="a SageMaker endpoint from a training job (or model.tar.gz), then one image",
        description="CreateModel, CreateEndpointConfig and CreateEndpoint (UpdateEndpoint when "
        "the endpoint exists), wait until InService, send one image and print the answer.",
    )
    _model_arguments(deploy_parser)
    deploy_parser.add_argument(
        "--endpoint-name", help="default: the training job's name (an existing one is updated)"
    )
    deploy_parser.add_argument(
        "--sample",
        type=Path,
        metavar="IMAGE",
        help="the image to send once InService (default: a generated one)",
    )
    deploy_parser.add_argument("--wait-minutes", type=float, default=30)
    deploy_parser.set_defaults(run=run_deploy)

    transform_parser = subparsers.add_parser(
        "transform",
        help="a Batch Transform job over an S3 prefix of images",
        description="CreateModel and CreateTransformJob, wait, print where the results are.",
    )
    _model_arguments(transform_parser)
    transform_parser.add_argument(
        "--input",
        required=True,
        metavar="S3_PREFIX",
        help="s3:// prefix of the images (one per object) or JSON Lines",
    )
    transform_parser.add_argument(
        "--output",
        metavar="S3_PREFIX",
        help="default: s3://<input bucket>/sm-effdet/transform/<name>/",
    )
    transform_parser.add_argument(
        "--content-type",
        default="image/jpeg",
        help="image/jpeg (default), image/png, application/x-image, application/jsonlines",
    )
    transform_parser.add_argument("--accept", default="application/json")
    transform_parser.add_argument(
        "--name", help="transform job name (default: from the job and time)"
    )
    transform_parser.add_argument("--wait-minutes", type=float, default=120)
    transform_parser.set_defaults(run=run_transform)


def _clients(*services: str, given: Mapping[str, Any]) -> list:
    made = []
    for service in services:
        found = given.get(service)
        if found is None:
            from .aws import client

            found = client(service)
        made.append(found)
    return made


def run_deploy(args, *, sagemaker=None, runtime=None, s3=None, out: TextIO = sys.stdout) -> int:
    sagemaker, runtime, s3 = _clients(
        "sagemaker",
        "sagemaker-runtime",
        "s3",
        given={"sagemaker": sagemaker, "sagemaker-runtime": runtime, "s3": s3},
    )
    return deploy(args, sagemaker=sagemaker, runtime=runtime, s3=s3, out=out)


def run_transform(args, *, sagemaker=None, s3=None, out: TextIO = sys.stdout) -> int:
    sagemaker, s3 = _clients("sagemaker", "s3", given={"sagemaker": sagemaker, "s3": s3})
    return transform(args, sagemaker=sagemaker, s3=s3, out=out)
