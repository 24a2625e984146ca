"""`sm-effdet deploy`: a real-time endpoint from a training job's model.tar.gz, then one image.

CreateModel, CreateEndpointConfig and CreateEndpoint (UpdateEndpoint when the endpoint exists),
then wait until InService and send one image (a given one, or a PNG made here) to show the
answer. What deploy shares with transform is in hosting.py.
"""

from __future__ import annotations

import json
import struct
import sys
import time
import zlib
from pathlib import Path
from typing import TextIO

from ..errors import UserInputError, shorten
from .hosting import (
    clients,
    create_model,
    endpoint_config_request,
    endpoint_request,
    image_and_role,
    invoke_request,
    model_arguments,
    model_source,
    parse_env,
    resource_name,
    stamp,
    undone_on_error,
    update_endpoint_request,
    wait_until,
)

# serve's content types for one raw image (README, "What serve does").
IMAGE_CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}
ANSWER_LIMIT = 4000  # characters of the endpoint's answer printed


# --- Sending an image -------------------------------------------------------------------


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
    image_and_role(args, source)
    endpoint = args.endpoint_name or source["JobName"] or f"sm-effdet-{stamp()}"
    existing = _existing_endpoint(sagemaker, endpoint)
    if existing and existing["EndpointStatus"] not in ("InService",):
        raise UserInputError(
            f"endpoint {endpoint} exists and is {existing['EndpointStatus']}; wait until it is "
            "InService to update it (a Failed one must be deleted: aws sagemaker delete-endpoint "
            f"--endpoint-name {endpoint}), or choose another --endpoint-name."
        )
    names = resource_name(endpoint, stamp())
    config = endpoint_config_request(
        names,
        model_name=names,
        instance_type=args.instance_type,
        instance_count=args.instance_count,
    )
    endpoint_request(endpoint, names)  # checked before the model is created
    create_model(sagemaker, args, source, names, out)
    with undone_on_error(sagemaker, model=names):
        sagemaker.create_endpoint_config(**config)
    print(f"CreateEndpointConfig {names}: {args.instance_count} x {args.instance_type}", file=out)
    with undone_on_error(sagemaker, model=names, endpoint_config=names):
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
    failed = wait_until(
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


# --- The command ------------------------------------------------------------------------


def add_commands(subparsers) -> None:
    deploy_parser = subparsers.add_parser(
        "deploy",
        help="a SageMaker endpoint from a training job (or model.tar.gz), then one image",
        description="CreateModel, CreateEndpointConfig and CreateEndpoint (UpdateEndpoint when "
        "the endpoint exists), wait until InService, send one image and print the answer.",
    )
    model_arguments(deploy_parser)
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


def run_deploy(args, *, sagemaker=None, runtime=None, s3=None, out: TextIO = sys.stdout) -> int:
    sagemaker, runtime, s3 = clients(
        "sagemaker",
        "sagemaker-runtime",
        "s3",
        given={"sagemaker": sagemaker, "sagemaker-runtime": runtime, "s3": s3},
    )
    return deploy(args, sagemaker=sagemaker, runtime=runtime, s3=s3, out=out)
