"""`sm-effdet transform`: a Batch Transform job over an S3 prefix of images (or JSON Lines)
with a training job's model.tar.gz; what it shares with deploy is in hosting.py."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from ..errors import UserInputError, shorten
from .hosting import (
    clients,
    create_model,
    image_and_role,
    model_arguments,
    model_source,
    parse_env,
    resource_name,
    stamp,
    transform_request,
    undone_on_error,
    wait_until,
)
from .upload import split_s3


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
    image_and_role(args, source)
    count = _check_input(s3, args.input)
    name = args.name or resource_name(source["JobName"] or "sm-effdet-transform", stamp())
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
    with undone_on_error(sagemaker, model=name):
        sagemaker.create_transform_job(**request)
    more = "+" if count >= 1000 else ""
    print(
        f"CreateTransformJob {name}: {count}{more} objects under {args.input} "
        f"({args.content_type}) -> {output}",
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
        help="image/jpeg (default), image/png, application/x-image, application/jsonlines",
    )
    transform_parser.add_argument("--accept", default="application/json")
    transform_parser.add_argument(
        "--name", help="transform job name (default: from the job and time)"
    )
    transform_parser.add_argument("--wait-minutes", type=float, default=120)
    transform_parser.set_defaults(run=run_transform)


def run_transform(args, *, sagemaker=None, s3=None, out: TextIO = sys.stdout) -> int:
    sagemaker, s3 = clients("sagemaker", "s3", given={"sagemaker": sagemaker, "s3": s3})
    return transform(args, sagemaker=sagemaker, s3=s3, out=out)
