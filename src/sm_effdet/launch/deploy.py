"""`sm-effdet deploy`: a real-time endpoint from a training job's model.tar.gz, then one image.

CreateModel, CreateEndpointConfig and CreateEndpoint (UpdateEndpoint when the endpoint exists,
then the previous config and model are deleted once the new ones serve), then wait until
InService and send one image (a given one, or a PNG made here) to show the answer. What deploy
shares with transform is in hosting.py; listing and deleting endpoints is in endpoints.py.
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
from .aws import is_not_found
from .endpoints import delete_config_and_models, replace_old_config
from .hosting import (
    check_invoke_body,
    cleanup_command,
    clients,
    create_model,
    endpoint_config_request,
    endpoint_request,
    image_and_role,
    invoke_request,
    model_arguments,
    model_request,
    model_source,
    parse_env,
    print_requests,
    resource_name,
    stamp,
    undone_on_error,
    update_endpoint_request,
    wait_until,
)

# serve's content types for one raw image (docs/serving.md).
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
    """The body, its content type and how to name it in the output; one too large for
    InvokeEndpoint is refused here, before anything is created."""
    if path is None:
        return generated_png(), "image/png", "a generated 256x256 image"
    content_type = IMAGE_CONTENT_TYPES.get(path.suffix.lower(), "application/x-image")
    try:
        body = path.read_bytes()
    except OSError as exc:
        raise UserInputError(f"cannot read the --sample image {path}: {exc.strerror}.") from None
    check_invoke_body(len(body), f"the --sample image {path}")
    return body, content_type, str(path)


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
    try:
        return sagemaker.describe_endpoint(EndpointName=name)
    except Exception as exc:
        if is_not_found(exc):
            return None
        raise


def _update_view(describe, old_config: str, new_config: str):
    """DescribeEndpoint during an update, its status as wait_for reads it: an endpoint still
    InService on the old config is not updated yet, or, with a FailureReason, failed the update
    (SageMaker rolls it back to the old config, InService)."""

    def view() -> dict:
        description = dict(describe())
        if description["EndpointStatus"] == "InService" and description.get("EndpointConfigName") != new_config:
            if description.get("FailureReason"):
                description["EndpointStatus"] = "Failed"
                description["FailureReason"] = (
                    f"the update failed and it serves {old_config} again: "
                    f"{description['FailureReason'].rstrip('.')}"
                )
            else:
                description["EndpointStatus"] = "Updating"
        return description

    return view


def deploy(args, *, sagemaker, runtime, s3, out: TextIO = sys.stdout, sleep=time.sleep) -> int:
    environment = parse_env(args.env)  # bad input first, before any call
    body, content_type, label = sample_image(args.sample)
    source = model_source(sagemaker, s3, args.source)
    image, role = image_and_role(args, source)
    endpoint = args.endpoint_name or source["JobName"] or f"sm-effdet-{stamp()}"
    existing = _existing_endpoint(sagemaker, endpoint)
    if existing and existing["EndpointStatus"] not in ("InService",):
        raise UserInputError(
            f"endpoint {endpoint} exists and is {existing['EndpointStatus']}; wait until it is "
            f"InService to update it (a Failed one must be deleted: {cleanup_command(endpoint)}), "
            "or choose another --endpoint-name."
        )
    names = resource_name(endpoint, stamp())
    model = model_request(names, image=image, model_data=source["ModelDataUrl"], role=role,
                          environment=environment)
    config = endpoint_config_request(
        names,
        model_name=names,
        instance_type=args.instance_type,
        instance_count=args.instance_count,
    )
    # Both checked before the model is created.
    if existing:
        change = ("UpdateEndpoint", update_endpoint_request(endpoint, names))
    else:
        change = ("CreateEndpoint", endpoint_request(endpoint, names))
    if args.dry_run:
        print_requests({"CreateModel": model, "CreateEndpointConfig": config, change[0]: change[1]})
        return 0
    create_model(sagemaker, model, source, out)
    with undone_on_error(sagemaker, model=names):
        sagemaker.create_endpoint_config(**config)
    print(f"CreateEndpointConfig {names}: {args.instance_count} x {args.instance_type}", file=out)
    with undone_on_error(sagemaker, model=names, endpoint_config=names):
        if existing:
            sagemaker.update_endpoint(**change[1])
        else:
            sagemaker.create_endpoint(**change[1])
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
        if existing:
            print(f"The previous config {existing['EndpointConfigName']} and its model stay; "
                  "a deploy that waits deletes them once the update is InService.", file=out)
        return 0
    print(
        f"Waiting for {endpoint} to be InService (at most {args.wait_minutes:g} minutes):", file=out
    )
    describe = lambda: sagemaker.describe_endpoint(EndpointName=endpoint)  # noqa: E731
    if existing:
        describe = _update_view(describe, existing["EndpointConfigName"], names)
    failed = wait_until(
        args, f"endpoint {endpoint}", describe, "EndpointStatus", "InService",
        f"endpoint {endpoint} goes on being {'updated' if existing else 'created'}: aws "
        f"sagemaker describe-endpoint --endpoint-name {endpoint}", out=out, sleep=sleep,
    )
    if failed is not None:
        if failed != 130:
            _after_failure(sagemaker, endpoint, names, existing, out)
        return failed
    if existing:
        replace_old_config(sagemaker, endpoint, existing["EndpointConfigName"], names, out=out)
    # A failed smoke test leaves the endpoint running and billed: say how to remove it all,
    # whatever the failure (serve's refusal, a timeout, an AWS error, Ctrl-C).
    hint = (f"sm-effdet: the endpoint {endpoint} keeps running (and billing); delete it with its "
            f"config and model: {cleanup_command(endpoint)}")
    try:
        answered = invoke(runtime, endpoint, body, content_type, label, out)
    except BaseException:
        print(hint, file=sys.stderr)
        raise
    if not answered:
        print(hint, file=sys.stderr)
        return 1
    print(
        f"Call it: sm-effdet predict {endpoint} photo.jpg (or aws sagemaker-runtime "
        f"invoke-endpoint --endpoint-name {endpoint} --content-type image/jpeg --body "
        "fileb://photo.jpg out.json)",
        file=out,
    )
    print(f"Delete it with its config and model: {cleanup_command(endpoint)}", file=out)
    return 0


def _after_failure(sagemaker, endpoint: str, names: str, existing: dict | None, out: TextIO) -> None:
    """What is left after an endpoint failed to come up, and the command that removes it."""
    if existing:
        # Rolled back: the old config still serves; the new config and model are orphans.
        description = _existing_endpoint(sagemaker, endpoint) or {}
        rolled_back = description.get("EndpointStatus") == "InService" and description.get(
            "EndpointConfigName") == existing["EndpointConfigName"]
        if rolled_back:  # not while the update still runs (the wait ran out)
            print(f"Deleting the new config and model that {endpoint} does not serve:", file=out)
            delete_config_and_models(sagemaker, names, out=out)
            return
    print(f"sm-effdet: the endpoint {endpoint} is left as it is; delete it with its config and "
          f"model: {cleanup_command(endpoint)}", file=sys.stderr)


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


def run_deploy(args, *, sagemaker=None, runtime=None, s3=None, out: TextIO | None = None) -> int:
    out = out if out is not None else sys.stdout  # at call time: tests capture it
    sagemaker, runtime, s3 = clients(
        "sagemaker",
        "sagemaker-runtime",
        "s3",
        given={"sagemaker": sagemaker, "sagemaker-runtime": runtime, "s3": s3},
    )
    return deploy(args, sagemaker=sagemaker, runtime=runtime, s3=s3, out=out)
