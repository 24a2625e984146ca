"""What `sm-effdet deploy` and `sm-effdet transform` share: a training job's model.tar.gz
served by the same image (README, "What serve does"), as a real-time endpoint (deploy.py) or a
Batch Transform job (transform.py).

Here: resource names, where the model comes from, the requests (each checked against
botocore's model; the Airflow DAG builds its requests with them too), creating the model,
waiting for an endpoint or a transform job, and the arguments both commands take.
"""

from __future__ import annotations

import argparse
import contextlib
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


# --- Creating the model -----------------------------------------------------------------


def image_and_role(args, source: Mapping[str, Any]) -> tuple[str, str]:
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
    image, role = image_and_role(args, source)
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


def clients(*services: str, given: Mapping[str, Any]) -> list:
    made = []
    for service in services:
        found = given.get(service)
        if found is None:
            from .aws import client

            found = client(service)
        made.append(found)
    return made
