"""The one job spec: the command line's choices turned into the exact CreateTrainingJob request.

`train`, `tune`, the local mode and the Airflow DAG all build their request here, so that the
defaults a careful user would pick (spot with checkpoints, FastFile, the metric regexes that
match the job's log, TensorBoard, hyperparameters as the strings the API takes) are set once.
Everything that can be checked on this machine is checked before any AWS call.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import UserInputError, shorten

PROJECT = "sm-effdet"
REPOSITORY = "sm-effdet"
DEFAULT_PREFIX = "sm-effdet"
DEFAULT_INSTANCE_TYPE = "ml.g5.xlarge"
DEFAULT_VOLUME_GB = 50
DEFAULT_MAX_RUN = 24 * 3600
# A spot job waits for capacity and restarts after interruptions within MaxWait; twice the run
# time leaves room for both without letting a job hang for days.
SPOT_WAIT_FACTOR = 2
# Retries cover SageMaker's internal errors and spot capacity; each restarts from the checkpoint.
RETRY_ATTEMPTS = 2
CHECKPOINT_LOCAL_PATH = "/opt/ml/checkpoints"
TENSORBOARD_LOCAL_PATH = "/opt/ml/output/tensorboard"
INPUT_MODES = ("FastFile", "File", "Pipe")
CHANNELS = ("training", "validation", "pretrained", "model")
# The channels whose data can be an augmented manifest streamed in Pipe mode.
MANIFEST_CHANNELS = ("training", "validation")
ROLE_ARN = re.compile(r"arn:aws[a-z-]*:iam::(\d{12}):role/[\w+=,.@/-]+")
ECR_URI = re.compile(
    r"(\d{12})\.dkr\.ecr(-fips)?\.([a-z0-9-]+)\.amazonaws\.com(\.cn)?/[a-z0-9._/-]+(:[\w.-]{1,128}|@sha256:[0-9a-f]{64})"
)
REPO_ROOT = Path(__file__).resolve().parents[3]


# ---------------------------------------------------------------- the flags


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"'{text}' is not KEY=VALUE")
    return key, value


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """Every flag of a training job (train and tune take the same ones)."""
    data = parser.add_argument_group("data (each a local folder, uploaded first, or an s3:// URI)")
    data.add_argument("--data", metavar="DIR|S3URI", help="the training channel (required)")
    data.add_argument("--validation", metavar="DIR|S3URI", help="the validation channel")
    data.add_argument("--pretrained", metavar="DIR|S3URI",
                      help="weights for the 'pretrained' channel (needed with network isolation)")
    data.add_argument("--model", metavar="DIR|S3URI",
                      help="an earlier model for the 'model' channel (warm start)")
    data.add_argument("--input-mode", choices=INPUT_MODES, default="FastFile",
                      help="how SageMaker gives the job its data (default FastFile)")
    data.add_argument("--augmented-manifest", metavar="ATTRIBUTES",
                      help="--data (and --validation) are s3:// Ground Truth augmented manifests "
                      "streamed in Pipe mode, as the built-in algorithm takes them: their "
                      "AttributeNames, comma-separated, source-ref first (e.g. "
                      "source-ref,bounding-box,bounding-box-metadata)")

    aws = parser.add_argument_group("where it runs")
    aws.add_argument("--role", help="the SageMaker execution role ARN (arn:aws:iam::ACCOUNT:role/NAME)")
    aws.add_argument("--bucket", help="S3 bucket for data, checkpoints and outputs "
                     "(default sagemaker-REGION-ACCOUNT, the SageMaker SDK's bucket)")
    aws.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"key prefix in the bucket (default {DEFAULT_PREFIX})")
    aws.add_argument("--image", help="training image URI (default: REPOSITORY:TAG in the role "
                     "account's ECR, as `make push` prints it)")
    aws.add_argument("--image-tag", metavar="TAG",
                     help="image tag for the default image (default: git rev-parse --short HEAD)")
    aws.add_argument("--instance-type", default=DEFAULT_INSTANCE_TYPE,
                     help=f"default {DEFAULT_INSTANCE_TYPE}")
    aws.add_argument("--instance-count", type=int, default=1)
    aws.add_argument("--volume-size", type=int, default=DEFAULT_VOLUME_GB, metavar="GB",
                     help=f"EBS volume per instance (default {DEFAULT_VOLUME_GB})")
    spot = aws.add_mutually_exclusive_group()
    spot.add_argument("--spot", dest="spot", action="store_true", default=True,
                      help="managed spot training with checkpoints (the default)")
    spot.add_argument("--no-spot", dest="spot", action="store_false", help="on-demand instances")
    aws.add_argument("--max-run", type=int, default=DEFAULT_MAX_RUN, metavar="SECONDS",
                     help=f"MaxRuntimeInSeconds (default {DEFAULT_MAX_RUN})")
    aws.add_argument("--max-wait", type=int, metavar="SECONDS",
                     help=f"MaxWaitTimeInSeconds for spot (default {SPOT_WAIT_FACTOR} x --max-run)")
    aws.add_argument("--network-isolation", action="store_true",
                     help="no network in the container (give --pretrained weights)")
    aws.add_argument("--subnet", action="append", default=[], metavar="SUBNET_ID")
    aws.add_argument("--security-group", action="append", default=[], metavar="SG_ID")
    aws.add_argument("--env", action="append", default=[], type=_key_value, metavar="KEY=VALUE",
                     help="container environment variable (repeatable)")
    aws.add_argument("--tag", action="append", default=[], type=_key_value, metavar="KEY=VALUE",
                     help="tag of the job (repeatable)")

    job = parser.add_argument_group("the job")
    job.add_argument("--hyperparameters", type=Path, metavar="FILE",
                     help="JSON object of hyperparameters (see hyperparameters.example.json)")
    job.add_argument("--set", action="append", default=[], type=_key_value, metavar="KEY=VALUE",
                     dest="set_values", help="one hyperparameter, after the file (repeatable)")
    job.add_argument("--name", help="the training job's name (default sm-effdet-BACKBONE-TIME)")
    job.add_argument("--local", action="store_true",
                     help="run the same request on this machine instead of SageMaker")
    job.add_argument("--dry-run", action="store_true",
                     help="print the exact request as JSON and call nothing")


# ---------------------------------------------------------------- small pieces


def read_hyperparameters(path: Path | None, set_values: list[tuple[str, str]]) -> dict[str, str]:
    """The file's and --set's hyperparameters as the strings the API takes, checked by the job's
    own parser first (a value the job would refuse is refused here, in seconds)."""
    from ..hyperparameters import parse_hyperparameters

    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = json.loads(path.read_text())
        except OSError as exc:
            raise UserInputError(f"cannot read the hyperparameters file {path} ({exc.strerror}); "
                                 "give an existing JSON file.") from None
        except ValueError as exc:
            raise UserInputError(f"the hyperparameters file {path} is not valid JSON ({exc}); "
                                 "fix it or pass values with --set key=value.") from None
        if not isinstance(raw, dict):
            raise UserInputError(f"the hyperparameters file {path} holds a JSON "
                                 f"{type(raw).__name__}; it must hold one object of key: value.")
    raw.update(dict(set_values))
    parse_hyperparameters(raw)
    # Strings as they are; JSON for the rest, so that true stays "true", never Python's "True".
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in raw.items()}


def job_name(backbone: str, now: float | None = None) -> str:
    """sm-effdet-BACKBONE-YYYYmmdd-HHMMSS, valid for SageMaker's [a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    slug = re.sub(r"[^a-zA-Z0-9]+", "-", backbone).strip("-")[:63 - len(PROJECT) - len(stamp) - 2]
    return "-".join(p for p in (PROJECT, slug.strip("-"), stamp) if p)


def region_name(required: bool = True) -> str | None:
    """The region the boto3 way (AWS_REGION, AWS_DEFAULT_REGION, the profile), or the caller's
    (aws.clients_from: an Airflow connection's); no AWS call."""
    import botocore.session

    from .aws import scoped_region

    region = (scoped_region() or os.environ.get("AWS_REGION")
              or botocore.session.Session().get_config_variable("region"))
    if not region and required:
        raise UserInputError("no AWS region is set; set AWS_REGION (or AWS_DEFAULT_REGION) or "
                             "a region in your AWS profile.")
    return region


def role_account(role: str | None) -> str:
    if not role:
        raise UserInputError("no execution role was given; pass --role arn:aws:iam::ACCOUNT:role/NAME, "
                             "a role SageMaker can assume that reads and writes your bucket.")
    match = ROLE_ARN.fullmatch(role)
    if not match:
        raise UserInputError(f"--role '{shorten(role)}' is not an IAM role ARN; give one shaped "
                             "like arn:aws:iam::123456789012:role/NAME.")
    return match.group(1)


def git_tag() -> str | None:
    """`make`'s TAG: the checkout's short commit ("dev" without git); None when installed from a
    wheel, where no checkout says which image was pushed."""
    if not (REPO_ROOT / "Makefile").is_file() or not (REPO_ROOT / "src" / "sm_effdet").is_dir():
        return None
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=10)
        return done.stdout.strip() or "dev"
    except (OSError, subprocess.SubprocessError):
        return "dev"


def default_image(account: str, region: str, tag: str | None = None) -> str:
    """The URI `make push` prints: ACCOUNT.dkr.ecr.REGION.DOMAIN/REPOSITORY:TAG."""
    tag = tag or git_tag()
    if not tag:
        raise UserInputError("no image was given and there is no checkout to take `make push`'s "
                             "tag from; pass --image URI (or --image-tag TAG).")
    domain = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return f"{account}.dkr.ecr.{region}.{domain}/{REPOSITORY}:{tag}"


def check_image(image: str) -> None:
    if not ECR_URI.fullmatch(image):
        raise UserInputError(
            f"the image '{shorten(image)}' is not an ECR image URI; SageMaker trains only from "
            "ECR: run `make push` and pass the URI it prints (ACCOUNT.dkr.ecr.REGION."
            "amazonaws.com/REPOSITORY:TAG) as --image."
        )


def metric_definitions() -> list[dict[str, str]]:
    """metric_definitions.json: the regexes that match the job's epoch line (tests check that
    the file and the job agree); beside the package when installed, at the checkout's root."""
    for path in (Path(__file__).resolve().parents[1] / "metric_definitions.json",
                 REPO_ROOT / "metric_definitions.json"):
        if path.is_file():
            return json.loads(path.read_text())
    raise UserInputError("metric_definitions.json was not found beside the package nor at the "
                         "checkout's root; run sm-effdet from the checkout.")


def s3_uri(bucket: str, *parts: str) -> str:
    return "s3://" + "/".join([bucket, *(p.strip("/") for p in parts if p and p.strip("/"))])


def is_s3(value: str) -> bool:
    return value.startswith("s3://")


def dataset_name(folder: Path) -> str:
    return re.sub(r"[^a-zA-Z0-9._-]+", "-", folder.resolve().name).strip("-") or "data"


def channel(name: str, uri: str, attribute_names: list[str] | None = None) -> dict[str, Any]:
    source = {"S3DataType": "S3Prefix", "S3Uri": uri, "S3DataDistributionType": "FullyReplicated"}
    entry: dict[str, Any] = {"ChannelName": name, "DataSource": {"S3DataSource": source}}
    if attribute_names:
        # SageMaker streams an augmented manifest only in Pipe mode, one RecordIO record per
        # attribute; the job caches epoch 0's stream to disk (formats/pipe.py).
        source.update(S3DataType="AugmentedManifestFile", AttributeNames=list(attribute_names))
        entry.update(InputMode="Pipe", RecordWrapperType="RecordIO")
    return entry


# ---------------------------------------------------------------- the request


def build_training_request(
    *,
    name: str,
    role: str,
    image: str,
    channels: dict[str, str],
    output_path: str,
    hyperparameters: dict[str, str],
    checkpoint_uri: str | None,
    tensorboard_uri: str | None,
    instance_type: str = DEFAULT_INSTANCE_TYPE,
    instance_count: int = 1,
    volume_size: int = DEFAULT_VOLUME_GB,
    input_mode: str = "FastFile",
    spot: bool = True,
    max_run: int = DEFAULT_MAX_RUN,
    max_wait: int | None = None,
    network_isolation: bool = False,
    subnets: list[str] | None = None,
    security_groups: list[str] | None = None,
    environment: dict[str, str] | None = None,
    tags: dict[str, str] | None = None,
    augmented_manifest: list[str] | None = None,
) -> dict[str, Any]:
    """The CreateTrainingJob request, not yet checked (`check_request` does that).
    `augmented_manifest`: the AttributeNames of the training and validation channels, which are
    then augmented manifests streamed in Pipe mode."""
    stopping: dict[str, int] = {"MaxRuntimeInSeconds": max_run}
    request: dict[str, Any] = {
        "TrainingJobName": name,
        "RoleArn": role,
        "AlgorithmSpecification": {
            "TrainingImage": image,
            "TrainingInputMode": input_mode,
            "MetricDefinitions": metric_definitions(),
            "EnableSageMakerMetricsTimeSeries": True,
        },
        "HyperParameters": hyperparameters,
        "InputDataConfig": [
            channel(c, channels[c], augmented_manifest if c in MANIFEST_CHANNELS else None)
            for c in CHANNELS if c in channels
        ],
        "OutputDataConfig": {"S3OutputPath": output_path},
        "ResourceConfig": {
            "InstanceType": instance_type,
            "InstanceCount": instance_count,
            "VolumeSizeInGB": volume_size,
        },
        "StoppingCondition": stopping,
        "EnableNetworkIsolation": network_isolation,
        "RetryStrategy": {"MaximumRetryAttempts": RETRY_ATTEMPTS},
    }
    if spot:
        request["EnableManagedSpotTraining"] = True
        stopping["MaxWaitTimeInSeconds"] = max_wait if max_wait is not None else max_run * SPOT_WAIT_FACTOR
    elif max_wait is not None:
        stopping["MaxWaitTimeInSeconds"] = max_wait  # refused by check_request with its sentence
    if checkpoint_uri:
        # Not only for spot: retries and stops resume from it too (the job writes one per epoch).
        request["CheckpointConfig"] = {"S3Uri": checkpoint_uri, "LocalPath": CHECKPOINT_LOCAL_PATH}
    if tensorboard_uri:
        request["TensorBoardOutputConfig"] = {
            "S3OutputPath": tensorboard_uri, "LocalPath": TENSORBOARD_LOCAL_PATH,
        }
    if subnets or security_groups:
        request["VpcConfig"] = {"Subnets": list(subnets or []),
                                "SecurityGroupIds": list(security_groups or [])}
    if environment:
        request["Environment"] = dict(environment)
    if tags:
        request["Tags"] = [{"Key": k, "Value": v} for k, v in tags.items()]
    return request


def check_job_choices(args: argparse.Namespace, hyperparameters: dict[str, str]) -> None:
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
    if (args.subnet and not args.security_group) or (args.security_group and not args.subnet):
        raise UserInputError("a VPC needs both --subnet and --security-group; give both or neither.")


def attribute_names(text: str | None) -> list[str] | None:
    return [a.strip() for a in text.split(",") if a.strip()] if text else None


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


def local_channels(args: argparse.Namespace) -> dict[str, str]:
    """Channel name -> the flag's value (--data is the training channel)."""
    flags = {"training": "data", "validation": "validation", "pretrained": "pretrained",
             "model": "model"}
    return {c: getattr(args, flags[c]) for c in CHANNELS if getattr(args, flags[c], None)}


def check_local_data(channels: dict[str, str], hyperparameters: dict[str, str], out=sys.stdout) -> None:
    """Read the local training (and validation) folders with the job's own reader, images not
    opened, and print its data report summary: a dataset the job would refuse is refused here."""
    from ..data.formats import DataReport, read_dataset
    from ..hyperparameters import parse_hyperparameters

    local = {}
    for name in ("training", "validation"):
        value = channels.get(name)
        if value and not is_s3(value):
            folder = Path(value)
            if not folder.is_dir():
                raise UserInputError(f"the {name} folder {value} does not exist; give a local "
                                     "folder of images and annotations, or an s3:// URI.")
            local[name] = folder
    for name in ("pretrained", "model"):
        value = channels.get(name)
        if value and not is_s3(value) and not Path(value).is_dir():
            raise UserInputError(f"the {name} folder {value} does not exist; give a local folder "
                                 "or an s3:// URI.")
    if "training" not in local:
        return
    if "validation" in channels and "validation" not in local:
        local.pop("validation", None)
    report = DataReport()
    dataset = read_dataset(local, parse_hyperparameters(hyperparameters), report)
    print(f"{report.summary()}; {len(dataset.categories)} classes, {len(dataset.train)} training "
          f"and {len(dataset.val)} validation images", file=out)


def prepare_training_request(args: argparse.Namespace, *, s3=None, out=sys.stdout) -> dict[str, Any]:
    """Check everything on this machine (the flags, hyperparameters, image, the request, then
    the local data), then (unless a dry run or local) check the bucket and
    upload the local folders; return the validated CreateTrainingJob request."""
    from ..hyperparameters import parse_hyperparameters
    from .validation import check_request

    hyperparameters = read_hyperparameters(args.hyperparameters, args.set_values)
    check_job_choices(args, hyperparameters)
    check_instance_type(args.instance_type)
    channels = local_channels(args)
    local = bool(getattr(args, "local", False))
    if local:
        region = region_name(required=False) or "us-east-1"
        account = role_account(args.role) if args.role else "000000000000"
        role = args.role or f"arn:aws:iam::{account}:role/sm-effdet-local"
    else:
        role = args.role
        account = role_account(role)
        region = region_name()
    image = args.image or default_image(account, region, getattr(args, "image_tag", None))
    if not local:  # a local run may use an image that was only built here (`docker run`)
        check_image(image)

    backbone = parse_hyperparameters(hyperparameters).backbone
    name = args.name or job_name(backbone)
    bucket = args.bucket or f"sagemaker-{region}-{account}"
    prefix = args.prefix
    uploads: dict[str, Path] = {}
    uris: dict[str, str] = {}
    use_files = local and not args.bucket
    for channel_name, value in channels.items():
        if is_s3(value):
            uris[channel_name] = value
        elif local:
            uris[channel_name] = Path(value).resolve().as_uri()
        else:
            folder = Path(value)
            uploads[channel_name] = folder
            uris[channel_name] = s3_uri(bucket, prefix, dataset_name(folder), "data", channel_name) + "/"
    if use_files:
        base = (Path.cwd() / "sm-effdet-output").resolve().as_uri()
        output, checkpoints, tensorboard = (
            f"{base}/jobs", f"{base}/checkpoints/{name}", f"{base}/tensorboard/{name}")
    else:
        output = s3_uri(bucket, prefix, "jobs")
        checkpoints = s3_uri(bucket, prefix, "checkpoints", name)
        tensorboard = s3_uri(bucket, prefix, "tensorboard", name)

    request = build_training_request(
        name=name, role=role, image=image, channels=uris, output_path=output,
        hyperparameters=hyperparameters, checkpoint_uri=checkpoints, tensorboard_uri=tensorboard,
        instance_type=args.instance_type, instance_count=args.instance_count,
        volume_size=args.volume_size, input_mode=args.input_mode, spot=args.spot,
        max_run=args.max_run, max_wait=args.max_wait, network_isolation=args.network_isolation,
        subnets=args.subnet, security_groups=args.security_group, environment=dict(args.env),
        tags=dict(args.tag), augmented_manifest=attribute_names(args.augmented_manifest),
    )
    check_request("CreateTrainingJob", _as_s3(request) if local else request)
    # The data last of the local checks: reading a large annotation file takes the longest.
    check_local_data(channels, hyperparameters, out=out)
    if args.dry_run or local:
        return request
    from .upload import check_bucket, upload_folder

    check_bucket(s3, bucket, prefix)
    for channel_name, folder in uploads.items():
        upload_folder(s3, folder, uris[channel_name], out=out)
    return request


def _as_s3(request: dict[str, Any]) -> dict[str, Any]:
    """The request with file:// URIs written as s3:// ones, to check the rest of it."""
    text = json.dumps(request).replace('"file:///', '"s3://local-file/')
    return json.loads(text)
