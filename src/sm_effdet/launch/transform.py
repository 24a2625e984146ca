"""`sm-effdet transform`: a Batch Transform job over an S3 prefix of images (or JSON Lines)
with a training job's model.tar.gz; what it shares with deploy is in hosting.py."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from ..errors import UserInputError, shorten
from .hosting import (
    JSONLINES_TYPES,
    MB,
    SERVE_CONTENT_TYPES,
    TRANSFORM_MAX_PAYLOAD_MB,
    check_transform_content_type,
    clients,
    create_model,
    image_and_role,
    model_arguments,
    model_request,
    model_source,
    parse_env,
    print_requests,
    resource_name,
    stamp,
    transform_payload_mb,
    transform_request,
    undone_on_error,
    wait_until,
)
from .upload import split_s3


def input_objects(s3, uri: str, content_type: str, page_size: int | None = None) -> tuple[int, int]:
    """The number of objects under `uri` and the largest one's size, all pages listed: each
    object is one request of the job (one record; JSON Lines are split per line), so none may
    be empty nor over Batch Transform's 100 MB."""
    bucket, prefix = split_s3(uri)
    count, largest, largest_key, empty = 0, 0, "", []
    kwargs = {"Bucket": bucket, "Prefix": prefix, **({"MaxKeys": page_size} if page_size else {})}
    while True:
        page = s3.list_objects_v2(**kwargs)
        for item in page.get("Contents", []):
            count += 1
            if item["Size"] == 0:
                empty.append(item["Key"])
            if item["Size"] > largest:
                largest, largest_key = item["Size"], item["Key"]
        if not page.get("IsTruncated"):
            break
        kwargs["ContinuationToken"] = page["NextContinuationToken"]
    if not count:
        raise UserInputError(
            f"there are no objects under {shorten(uri, 200)}; upload the images (one per object) "
            "or JSON Lines there first (aws s3 sync FOLDER URI)."
        )
    if empty:
        raise UserInputError(
            f"{len(empty)} of the objects under {shorten(uri, 200)} are empty (the first: "
            f"s3://{bucket}/{shorten(empty[0], 120)}, a console folder marker or a failed upload); "
            "Batch Transform sends each as a request and serve refuses an empty body: delete them."
        )
    whole = content_type not in JSONLINES_TYPES
    if whole and largest > TRANSFORM_MAX_PAYLOAD_MB * MB:
        raise UserInputError(
            f"s3://{bucket}/{shorten(largest_key, 120)} is {largest / MB:.1f} MB, over Batch "
            f"Transform's {TRANSFORM_MAX_PAYLOAD_MB} MB per request (MaxPayloadInMB); shrink or "
            "split it, or move it out of the input prefix."
        )
    return count, largest


def transform(args, *, sagemaker, s3, out: TextIO = sys.stdout, sleep=time.sleep) -> int:
    environment = parse_env(args.env)
    if not args.input.startswith("s3://"):
        raise UserInputError(
            f"--input {shorten(args.input, 100)!r} is not an S3 URI; give the s3:// prefix that "
            "holds the images."
        )
    check_transform_content_type(args.content_type)
    source = model_source(sagemaker, s3, args.source)
    image, role = image_and_role(args, source)
    count, largest = input_objects(s3, args.input, args.content_type)
    name = args.name or resource_name(source["JobName"] or "sm-effdet-transform", stamp())
    bucket, _ = split_s3(args.input)
    output = args.output or f"s3://{bucket}/sm-effdet/transform/{name}/"
    model = model_request(name, image=image, model_data=source["ModelDataUrl"], role=role,
                          environment=environment)
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
        max_payload_mb=transform_payload_mb(largest, args.content_type),
    )
    if args.dry_run:
        print_requests({"CreateModel": model, "CreateTransformJob": request})
        return 0
    create_model(sagemaker, model, source, out)
    with undone_on_error(sagemaker, model=name):
        sagemaker.create_transform_job(**request)
    print(
        f"CreateTransformJob {name}: {count} objects under {args.input} "
        f"({args.content_type}, the largest {largest / MB:.2f} MB; MaxPayloadInMB "
        f"{request['MaxPayloadInMB']}, MaxConcurrentTransforms "
        f"{request['MaxConcurrentTransforms']}) -> {output}",
        file=out,
    )
    if args.no_wait:
        print(
            "Not waiting; follow it: aws sagemaker describe-transform-job "
            f"--transform-job-name {name}",
            file=out,
        )
        return 0
    print(f"Waiting for {name} (at most {args.wait_minutes:g} minutes):", file=out)
    failed = wait_until(
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


# --- The command ------------------------------------------------------------------------


def add_commands(subparsers) -> None:
    transform_parser = subparsers.add_parser(
        "transform",
        help="a Batch Transform job over an S3 prefix of images",
        description="CreateModel and CreateTransformJob, wait, print where the results are.",
    )
    model_arguments(transform_parser)
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
        help=f"what serve decodes: {', '.join(SERVE_CONTENT_TYPES[:5])} (default image/jpeg)",
    )
    transform_parser.add_argument("--accept", default="application/json")
    transform_parser.add_argument(
        "--name", help="transform job name (default: from the job and time)"
    )
    transform_parser.add_argument("--wait-minutes", type=float, default=120)
    transform_parser.set_defaults(run=run_transform)


def run_transform(args, *, sagemaker=None, s3=None, out: TextIO | None = None) -> int:
    out = out if out is not None else sys.stdout  # at call time: tests capture it
    sagemaker, s3 = clients("sagemaker", "s3", given={"sagemaker": sagemaker, "s3": s3})
    return transform(args, sagemaker=sagemaker, s3=s3, out=out)
