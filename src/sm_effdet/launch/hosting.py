"""What `sm-effdet deploy` and `sm-effdet transform` share: a training job's model.tar.gz
served by the same image (docs/serving.md), as a real-time endpoint (deploy.py) or a
Batch Transform job (transform.py).

Here: resource names, where the model comes from, the requests (each checked against
botocore's model; the Airflow DAG builds its requests with them too), creating the model,
waiting for an endpoint or a transform job, and the arguments both commands take.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

from ..errors import UserInputError, shorten
from .upload import split_s3
from .validation import check_request

NAME_LIMIT = 63  # models, endpoint configs, endpoints and transform jobs
DEFAULT_INSTANCE_TYPE = "ml.m5.xlarge"
# What serve decodes (serving/decoding.py: RAW_IMAGE_TYPES, JSON_TYPES, JSONLINES_TYPES; a test
# keeps the two equal): the launcher imports nothing of serve.
IMAGE_TYPES = ("image/jpeg", "image/png", "application/x-image")
JSON_TYPES = ("application/json",)
JSONLINES_TYPES = ("application/jsonlines", "application/jsonl", "application/x-jsonlines")
SERVE_CONTENT_TYPES = IMAGE_TYPES + JSON_TYPES + JSONLINES_TYPES
# Batch Transform: MaxPayloadInMB at most 100, and MaxConcurrentTransforms x MaxPayloadInMB at
# most 100 (the service model's documentation); 6 is its default. Sizes are divided by 10^6, so
# that the payload is large enough whether SageMaker's MB is 10^6 or 2^20 bytes.
TRANSFORM_MAX_PAYLOAD_MB = 100
TRANSFORM_DEFAULT_PAYLOAD_MB = 6
MB = 1_000_000
# serve's SERVE_MAX_CONCURRENT_TRANSFORMS default: what its /execution-parameters offers.
SERVE_CONCURRENT_TRANSFORMS = 8


def cleanup_command(endpoint: str) -> str:
    """The one command that deletes an endpoint with its config and model (endpoints.py)."""
    return f"sm-effdet delete {endpoint}"


def print_requests(requests: Mapping[str, Any], out: TextIO | None = None) -> None:
    """--dry-run: the requests as JSON on stdout alone (as train's), keyed by operation."""
    print(json.dumps(requests, indent=2, default=str), file=out if out is not None else sys.stdout)


def stamp(now: datetime | None = None) -> str:
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
        from .aws import named

        with named("training job", source, sagemaker.meta.region_name,
                   "aws sagemaker list-training-jobs --sort-by CreationTime"):
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


def invoke_body_limit() -> int:
    """InvokeEndpoint's largest body in bytes (6 MiB: BodyBlob's maximum in botocore's model,
    which botocore itself does not check before sending)."""
    from .validation import service_model

    return int(service_model("sagemaker-runtime").shape_for("BodyBlob").metadata["max"])


def check_invoke_body(size: int, what: str) -> None:
    limit = invoke_body_limit()
    if size > limit:
        raise UserInputError(
            f"{what} is {size / 2**20:.1f} MiB, over InvokeEndpoint's limit of {limit / 2**20:g} "
            "MiB for a request body; send a smaller image (resize or recompress it) or use "
            "sm-effdet transform, which takes up to 100 MB per object."
        )


def invoke_request(
    endpoint: str,
    body: bytes,
    content_type: str,
    accept: str = "application/json",
    custom_attributes: str | None = None,
) -> dict:
    check_invoke_body(len(body), "the request body")
    request = {
        "EndpointName": endpoint,
        "ContentType": content_type,
        "Accept": accept,
        "Body": body,
    }
    if custom_attributes:
        request["CustomAttributes"] = custom_attributes
    check_request("InvokeEndpoint", request, service="sagemaker-runtime")
    return request


def check_transform_content_type(content_type: str) -> None:
    if content_type.split(";", 1)[0].strip().lower() not in SERVE_CONTENT_TYPES:
        raise UserInputError(
            f"--content-type {shorten(content_type, 60)!r} is not a type serve decodes; give "
            f"{', '.join(IMAGE_TYPES + JSON_TYPES)} (one image or JSON document per S3 object) or "
            "application/jsonlines (one {\"image\": \"<base64>\"} per line)."
        )


def transform_payload_mb(largest_object_bytes: int, content_type: str) -> int:
    """MaxPayloadInMB for objects of at most `largest_object_bytes`: each object is one record
    (one request) unless JSON Lines are split per line, whose lines an object's size does not
    bound from below, so they keep the default batch size."""
    if content_type in JSONLINES_TYPES:
        return TRANSFORM_DEFAULT_PAYLOAD_MB
    return max(1, math.ceil(largest_object_bytes / MB))


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
    max_payload_mb: int | None = None,
) -> dict:
    """`max_payload_mb`: MaxPayloadInMB (transform_payload_mb of the input's largest object),
    with MaxConcurrentTransforms such that the two stay within SageMaker's 100 MB."""
    check_transform_content_type(content_type)
    # One image per S3 object is one request; JSON Lines are split per line and batched
    # (serve's application/jsonlines), their answers joined line by line.
    lines = content_type in JSONLINES_TYPES
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
    if max_payload_mb is not None:
        if max_payload_mb > TRANSFORM_MAX_PAYLOAD_MB:
            raise UserInputError(
                f"MaxPayloadInMB {max_payload_mb} is over Batch Transform's "
                f"{TRANSFORM_MAX_PAYLOAD_MB} MB; split the input into smaller objects."
            )
        request["MaxPayloadInMB"] = max_payload_mb
        request["MaxConcurrentTransforms"] = max(
            1, min(SERVE_CONCURRENT_TRANSFORMS, TRANSFORM_MAX_PAYLOAD_MB // max_payload_mb)
        )
    if environment:
        request["Environment"] = dict(environment)
    check_request("CreateTransformJob", request)
    return request


# --- Creating the model -----------------------------------------------------------------


def image_and_role(args, source: Mapping[str, Any], *, client_for=None) -> tuple[str, str]:
    """The image and the execution role's ARN; --role may be a NAME or a session's assumed-role
    ARN, resolved as the SDK does (identity.py; an ARN takes no call)."""
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
    if args.role:
        from .identity import resolve_role

        role = resolve_role(args.role, client_for=client_for, out=sys.stderr)
    return image, role


def create_model(sagemaker, request: Mapping[str, Any], source: Mapping[str, Any], out: TextIO) -> str:
    """CreateModel with a request of model_request; one line saying what it serves."""
    sagemaker.create_model(**request)
    origin = f" (training job {source['JobName']})" if source["JobName"] else ""
    container = request["PrimaryContainer"]
    print(f"CreateModel {request['ModelName']}: {container['ModelDataUrl']}{origin}, image "
          f"{container['Image']}", file=out)
    return request["ModelName"]


@contextlib.contextmanager
def undone_on_error(sagemaker, *, model: str, endpoint_config: str | None = None):
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


def wait_until(
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


# --- The commands' common parts ---------------------------------------------------------


def model_arguments(parser) -> None:
    parser.add_argument(
        "source",
        metavar="JOB|MODEL_URI",
        help="a Completed training job's name, or the S3 URI of a model.tar.gz",
    )
    parser.add_argument("--image", help="image URI (default: the training job's image)")
    parser.add_argument(
        "--role",
        help="execution role: its ARN, NAME or a session's assumed-role ARN (default: the "
        "training job's role)",
    )
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
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the requests as JSON and create nothing (the training job, the model and "
        "what exists are still read)",
    )
    parser.add_argument("--poll-seconds", type=float, default=30, help=argparse.SUPPRESS)


def clients(*services: str, given: Mapping[str, Any]) -> list:
    made = []
    for service in services:
        found = given.get(service)
        if found is None:
            from .aws import client

            found = client(service)
        made.append(found)
    return made
