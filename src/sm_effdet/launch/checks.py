"""What the command line's values must be before a request is built, and the local data check.

Each check answers with one sentence naming the flag and what to give instead, before any data
is read (the bucket, the S3 URIs, the tags, the input mode) or, for the data itself, before
anything is uploaded. The rules of the request as a whole (spot, warm pools, encryption, run
times) are in validation.py, where every request passes, whoever built it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

from ..errors import UserInputError, shorten
from .validation import RESERVED_TAG_PREFIX

# The channels whose data can be an augmented manifest streamed in Pipe mode.
MANIFEST_CHANNELS = ("training", "validation")
# S3's bucket naming rules (general purpose buckets): 3 to 63 characters of lowercase letters,
# digits, dots and hyphens, a letter or digit at both ends, no "..", not an IP address.
BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
IP_ADDRESS = re.compile(r"\d+\.\d+\.\d+\.\d+")


def is_s3(value: str) -> bool:
    return value.startswith("s3://")


def attribute_names(text: str | None) -> list[str] | None:
    return [a.strip() for a in text.split(",") if a.strip()] if text else None


# ---------------------------------------------------------------- flags, before any data is read


def check_bucket_name(value: str, flag: str = "--bucket") -> None:
    if is_s3(value):
        bucket, _, key = value[len("s3://"):].partition("/")
        folder = f" --prefix {key.strip('/')}" if key.strip("/") else ""
        raise UserInputError(
            f"{flag} takes a bucket's name, not the URI '{shorten(value)}'; pass {flag} "
            f"{bucket or 'BUCKET'}{folder}."
        )
    if "/" in value:
        bucket, _, key = value.partition("/")
        raise UserInputError(
            f"{flag} '{shorten(value)}' names a folder in a bucket; pass the bucket alone "
            f"({flag} {bucket}) and the folder with --prefix {key.strip('/')}."
        )
    if (not BUCKET_NAME.fullmatch(value) or ".." in value or ".-" in value or "-." in value
            or IP_ADDRESS.fullmatch(value)):
        raise UserInputError(
            f"{flag} '{shorten(value)}' is not an S3 bucket name; a bucket name has 3 to 63 "
            "lowercase letters, digits, dots and hyphens and starts and ends with a letter or digit."
        )


def check_s3_location(value: str, flag: str) -> None:
    """An s3://BUCKET[/KEY] URI with a valid bucket name (--output-path, --checkpoint-s3-uri)."""
    if not is_s3(value):
        raise UserInputError(
            f"{flag} '{shorten(value)}' is not an s3:// URI; give one such as "
            "s3://my-bucket/folder."
        )
    bucket = value[len("s3://"):].partition("/")[0]
    try:
        check_bucket_name(bucket, flag)
    except UserInputError:
        raise UserInputError(
            f"{flag} '{shorten(value)}' does not start with a valid bucket name ('{shorten(bucket, 70)}'); "
            "give one such as s3://my-bucket/folder."
        ) from None


def check_flags(args: argparse.Namespace) -> None:
    """The values that are wrong whatever the data: refused before the data is read."""
    if args.bucket is not None:
        check_bucket_name(args.bucket)
    if is_s3(args.prefix or ""):
        raise UserInputError(f"--prefix '{shorten(args.prefix)}' is a key prefix in the bucket, "
                             "not an s3:// URI; pass --bucket BUCKET --prefix FOLDER.")
    for flag, value in (("--output-path", args.output_path),
                        ("--checkpoint-s3-uri", args.checkpoint_s3_uri)):
        if value is not None:
            check_s3_location(value, flag)
    # A key given twice keeps its last value (train --resume-from adds the command line's tags
    # after the old job's, so that they win).
    for key, _ in args.tag:
        if key.lower().startswith(RESERVED_TAG_PREFIX):
            raise UserInputError(
                f"--tag {shorten(key)}: keys starting with '{RESERVED_TAG_PREFIX}' are reserved "
                "for AWS's own tags; choose another key."
            )
    if args.subnet and not args.security_group or args.security_group and not args.subnet:
        raise UserInputError("a VPC needs both --subnet and --security-group; give both or neither.")


def check_input_mode(args: argparse.Namespace, channels: dict[str, str]) -> None:
    """Pipe mode streams augmented manifests only: a folder or an S3 prefix in Pipe mode is
    refused by the job after the instance is billed (and by --local up front)."""
    if args.input_mode != "Pipe":
        return
    manifests = MANIFEST_CHANNELS if args.augmented_manifest else ()
    for name in channels:
        if name not in manifests:
            raise UserInputError(
                f"--input-mode Pipe streams only augmented manifests (--augmented-manifest), but "
                f"the '{name}' channel is a folder of files, which the job cannot read from a "
                "pipe; use --input-mode FastFile (the default) or File."
            )


def check_job_choices(args: argparse.Namespace, hyperparameters: dict[str, str],
                      channels: dict[str, str]) -> None:
    """What the request itself cannot say is wrong: the data and isolation rules."""
    from ..hyperparameters import parse_hyperparameters

    if not args.data:
        raise UserInputError("no training data was given; pass --data with a local folder "
                             "(uploaded first) or an s3:// URI.")
    if args.network_isolation and not args.pretrained:
        if parse_hyperparameters(hyperparameters).pretrained is not False:
            raise UserInputError(
                "--network-isolation leaves the job no network to download pretrained weights "
                "from; pass --pretrained with a folder or s3:// URI holding them, or set "
                "pretrained=false to train from scratch."
            )
    if args.augmented_manifest:
        check_augmented_manifest(args, hyperparameters)
    check_input_mode(args, channels)


def check_augmented_manifest(args: argparse.Namespace, hyperparameters: dict[str, str]) -> None:
    """Augmented manifests are S3 objects streamed by SageMaker: nothing local to upload or
    read, and the job needs the image first, then its label (formats/pipe.py)."""
    names = attribute_names(args.augmented_manifest)
    if not names or names[0] != "source-ref" or len(names) < 2:
        raise UserInputError(
            f"--augmented-manifest '{shorten(args.augmented_manifest)}' must list source-ref "
            "first, then the label attribute (and its -metadata), comma-separated, e.g. "
            "source-ref,bounding-box,bounding-box-metadata."
        )
    for flag, value in (("--data", args.data), ("--validation", args.validation)):
        if value and not is_s3(value):
            raise UserInputError(
                f"with --augmented-manifest, {flag} must be the s3:// URI of the manifest (SageMaker "
                f"streams it in Pipe mode), not the local path '{shorten(value)}'; upload the "
                "manifest and its images, or use the manifest as a File-mode channel instead."
            )
    if getattr(args, "local", False):
        raise UserInputError(
            "--local cannot stream an augmented manifest in Pipe mode; run on SageMaker, or give "
            "--local a folder holding the manifest and its images (File mode)."
        )
    # The job finds the label attribute by itself; naming it keeps a stream that carries
    # several (an adjustment job's) unambiguous.
    hyperparameters.setdefault("label_attribute", names[1])


def check_instance_type(instance_type: str) -> None:
    """An instance type SageMaker does not train on, named with advice (the model's enum)."""
    from .validation import service_model

    known = service_model().shape_for("TrainingInstanceType").enum
    if instance_type not in known:
        like = [t for t in known if t.split(".")[1:2] == instance_type.split(".")[1:2]][:6] or [
            "ml.g5.xlarge", "ml.g6.xlarge", "ml.p4d.24xlarge", "ml.m5.xlarge"]
        raise UserInputError(
            f"--instance-type '{shorten(instance_type)}' is not an instance type SageMaker trains "
            f"on; choose one such as {', '.join(like)} (all {len(known)} are listed under "
            "TrainingInstanceType in botocore's SageMaker model)."
        )


# ---------------------------------------------------------------- the local folders


def check_folders(channels: dict[str, str]) -> dict[str, Path]:
    """The local channels' folders (the rest are s3:// URIs), each an existing directory."""
    flags = {"training": "--data", "validation": "--validation", "pretrained": "--pretrained",
             "model": "--model"}
    folders = {}
    for name, value in channels.items():
        if is_s3(value):
            continue
        path = Path(value)
        if path.is_file():
            raise UserInputError(
                f"{flags[name]} {value} is a file; give the folder that holds it "
                f"({path.resolve().parent}) with the rest of the {name} data, or an s3:// URI."
            )
        if not path.is_dir():
            raise UserInputError(f"the {name} folder {value} ({flags[name]}) does not exist; give a "
                                 "local folder, or an s3:// URI.")
        folders[name] = path
    return folders


def check_local_data(channels: dict[str, str], hyperparameters: dict[str, str],
                     out=sys.stdout) -> int | None:
    """Read the local training (and validation) folders with the job's own reader, images not
    opened, and print its data report summary: a dataset the job would refuse is refused here.
    Returns the number of validation images the job will score, None when not known here (the
    data, or the validation channel, is on S3)."""
    from ..data.formats import REPORT_FILE, DataReport, read_dataset
    from ..hyperparameters import parse_hyperparameters

    folders = check_folders(channels)
    local = {name: folders[name] for name in ("training", "validation") if name in folders}
    if "training" not in local:
        return None
    report = DataReport()
    try:
        dataset = read_dataset(local, parse_hyperparameters(hyperparameters), report)
    except UserInputError as exc:
        # The reader's messages point at the report the job writes (output/data/...), a path
        # that exists only inside the job: here, the local check's own report is written and
        # named instead.
        inside_job = f"output/data/{REPORT_FILE}"
        if inside_job not in str(exc):
            raise
        with tempfile.NamedTemporaryFile("w", prefix="sm-effdet-data-report-", suffix=".json",
                                         delete=False) as f:
            json.dump(report.to_dict(), f, indent=2, default=str)
        raise UserInputError(str(exc).replace(inside_job, f"the local check's report {f.name}")) from None
    print(f"{report.summary()}; {len(dataset.categories)} classes, {len(dataset.train)} training "
          f"and {len(dataset.val)} validation images", file=out)
    if "validation" in channels and "validation" not in local:
        return None  # the job scores the S3 validation channel, which was not read here
    return len(dataset.val)
