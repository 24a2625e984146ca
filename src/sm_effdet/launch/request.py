"""The one job spec: the command line's choices turned into the exact CreateTrainingJob request.

`train`, `tune`, the local mode and the Airflow DAG all build their request here, so that the
defaults a careful user would pick (spot with checkpoints, FastFile, the metric regexes that
match the job's log, TensorBoard, hyperparameters as the strings the API takes) are set once.
Everything that can be checked on this machine is checked before any AWS call.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserInputError, shorten
from .aws import region_name
from .checks import (
    MANIFEST_CHANNELS,
    attribute_names,
    check_flags,
    check_folders,
    check_instance_type,
    check_job_choices,
    check_local_data,
    is_s3,
)
from .images import REPO_ROOT, REPOSITORY, check_image, check_image_pushed, default_image, git_tag
from .upload import FolderListing

__all__ = [
    "REPOSITORY", "TrainingPlan", "add_job_arguments", "build_training_request", "carry_out",
    "check_image", "default_image", "git_tag", "job_name", "metric_definitions",
    "plan_training", "prepare_training_request", "read_hyperparameters",
]

PROJECT = "sm-effdet"
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
ROLE_ARN = re.compile(r"arn:aws[a-z-]*:iam::(\d{12}):role/[\w+=,.@/-]+")


# ---------------------------------------------------------------- the flags


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"'{text}' is not KEY=VALUE")
    return key, value


def add_job_arguments(parser: argparse.ArgumentParser, command: str = "train") -> None:
    """Every flag of a training job; `tune` takes the same ones, but names the tuning job with
    --name and has no --local."""
    from .validation import MAX_RUN_SECONDS, MAX_WARM_POOL_SECONDS

    data = parser.add_argument_group("data (each a local folder, uploaded first, or an s3:// URI)")
    data.add_argument("--data", metavar="DIR|S3URI", help="the training channel (required)")
    data.add_argument("--validation", metavar="DIR|S3URI", help="the validation channel")
    data.add_argument("--pretrained", metavar="DIR|S3URI",
                      help="weights for the 'pretrained' channel (needed with network isolation)")
    data.add_argument("--model", metavar="DIR|S3URI",
                      help="an earlier model for the 'model' channel (warm start)")
    data.add_argument("--input-mode", choices=INPUT_MODES, default="FastFile",
                      help="how SageMaker gives the job its data (default FastFile; Pipe only "
                      "with --augmented-manifest)")
    data.add_argument("--augmented-manifest", metavar="ATTRIBUTES",
                      help="--data (and --validation) are s3:// Ground Truth augmented manifests "
                      "streamed in Pipe mode, as the built-in algorithm takes them: their "
                      "AttributeNames, comma-separated, source-ref first (e.g. "
                      "source-ref,bounding-box,bounding-box-metadata)")
    data.add_argument("--sync", action="store_true",
                      help="delete objects under a local folder's S3 prefix that the folder lacks "
                      "(without it such a prefix is refused)")

    aws = parser.add_argument_group("where it runs")
    aws.add_argument("--role", help="the SageMaker execution role: its ARN, its NAME or a session's "
                     "assumed-role ARN (default: the role of these credentials, as in Studio)")
    aws.add_argument("--bucket", help="S3 bucket name for data, checkpoints and outputs (default "
                     "sagemaker-REGION-ACCOUNT, the SageMaker SDK's bucket, created when missing)")
    aws.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"key prefix in the bucket (default {DEFAULT_PREFIX})")
    aws.add_argument("--image", help="training image URI (default: REPOSITORY:TAG in the ECR of "
                     "these credentials' account, as `make push` prints it); checked in ECR before any upload")
    aws.add_argument("--image-tag", metavar="TAG",
                     help="image tag for the default image (default: git rev-parse --short HEAD)")
    aws.add_argument("--instance-type", default=DEFAULT_INSTANCE_TYPE,
                     help=f"default {DEFAULT_INSTANCE_TYPE}")
    aws.add_argument("--instance-count", type=int, default=1, metavar="N",
                     help="instances per job (default 1); more train one model data-parallel")
    aws.add_argument("--volume-size", type=int, default=DEFAULT_VOLUME_GB, metavar="GB",
                     help=f"EBS volume per instance (default {DEFAULT_VOLUME_GB})")
    spot = aws.add_mutually_exclusive_group()
    spot.add_argument("--spot", dest="spot", action="store_true", default=True,
                      help="managed spot training with checkpoints (the default)")
    spot.add_argument("--no-spot", dest="spot", action="store_false", help="on-demand instances")
    aws.add_argument("--max-run", type=int, default=DEFAULT_MAX_RUN, metavar="SECONDS",
                     help=f"MaxRuntimeInSeconds (default {DEFAULT_MAX_RUN}, at most "
                     f"{MAX_RUN_SECONDS}: 28 days)")
    aws.add_argument("--max-wait", type=int, metavar="SECONDS",
                     help=f"MaxWaitTimeInSeconds for spot (default {SPOT_WAIT_FACTOR} x --max-run, "
                     "at most 28 days)")
    aws.add_argument("--keep-alive-period", type=int, metavar="SECONDS",
                     help=f"keep the instances in a warm pool this long after the job (0 to "
                     f"{MAX_WARM_POOL_SECONDS}; needs --no-spot and a warm pool quota)")
    aws.add_argument("--network-isolation", action="store_true",
                     help="no network in the container (give --pretrained weights)")
    aws.add_argument("--subnet", action="append", default=[], metavar="SUBNET_ID",
                     help="run in this VPC subnet (repeatable; with --security-group)")
    aws.add_argument("--security-group", action="append", default=[], metavar="SG_ID",
                     help="the VPC security group (repeatable; with --subnet)")
    aws.add_argument("--env", action="append", default=[], type=_key_value, metavar="KEY=VALUE",
                     help="container environment variable (repeatable)")
    aws.add_argument("--tag", action="append", default=[], type=_key_value, metavar="KEY=VALUE",
                     help="tag of the job (repeatable; keys starting with aws: are AWS's)")

    store = parser.add_argument_group("outputs and encryption")
    store.add_argument("--output-path", metavar="S3URI",
                       help="where model.tar.gz and output.tar.gz go, under JOB/output/ "
                       "(default s3://BUCKET/PREFIX/jobs)")
    store.add_argument("--checkpoint-s3-uri", metavar="S3URI",
                       help="the job's checkpoints (default s3://BUCKET/PREFIX/checkpoints/JOB); a "
                       "job resumes from the checkpoints it finds there")
    store.add_argument("--output-kms-key", metavar="KEY",
                       help="KMS key (id, ARN, alias/NAME) that encrypts the model and outputs in S3")
    store.add_argument("--volume-kms-key", metavar="KEY",
                       help="KMS key (id or ARN) of the instances' EBS volumes (not for instance "
                       "types with local NVMe storage, such as ml.g5 and ml.p4d)")

    job = parser.add_argument_group("the job")
    job.add_argument("--hyperparameters", type=Path, metavar="FILE",
                     help="JSON object of hyperparameters (see hyperparameters.example.json)")
    job.add_argument("--set", action="append", default=[], type=_key_value, metavar="KEY=VALUE",
                     dest="set_values", help="one hyperparameter, after the file (repeatable)")
    if command == "tune":
        job.add_argument("--name", help="the tuning job's name, at most 32 characters (default "
                         "sm-effdet-BACKBONE-TIME); SageMaker names its trials after it")
    else:
        job.add_argument("--name", help="the training job's name (default sm-effdet-BACKBONE-TIME)")
        job.add_argument("--local", action="store_true",
                         help="run the same request on this machine instead of SageMaker")
    job.add_argument("--dry-run", action="store_true",
                     help="print the exact request as JSON; nothing is created or uploaded")


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


def role_account(role: str | None) -> str:
    if not role:
        raise UserInputError("no execution role was given; pass --role arn:aws:iam::ACCOUNT:role/NAME, "
                             "a role SageMaker can assume that reads and writes your bucket.")
    match = ROLE_ARN.fullmatch(role)
    if not match:
        raise UserInputError(f"--role '{shorten(role)}' is not an IAM role ARN; give one shaped "
                             "like arn:aws:iam::123456789012:role/NAME.")
    return match.group(1)


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
    output_kms_key: str | None = None,
    volume_kms_key: str | None = None,
    keep_alive_period: int | None = None,
) -> dict[str, Any]:
    """The CreateTrainingJob request, not yet checked (`check_request` does that).
    `augmented_manifest`: the AttributeNames of the training and validation channels, which are
    then augmented manifests streamed in Pipe mode."""
    from .validation import MAX_RUN_SECONDS

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
        # The derived wait stays within the 28 days a job may take (a longer --max-run is refused).
        stopping["MaxWaitTimeInSeconds"] = max_wait if max_wait is not None else max(
            min(max_run * SPOT_WAIT_FACTOR, MAX_RUN_SECONDS), max_run)
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
    if output_kms_key:
        request["OutputDataConfig"]["KmsKeyId"] = output_kms_key
    if volume_kms_key:
        request["ResourceConfig"]["VolumeKmsKeyId"] = volume_kms_key
    if keep_alive_period is not None:
        request["ResourceConfig"]["KeepAlivePeriodInSeconds"] = keep_alive_period
    return request


def local_channels(args: argparse.Namespace) -> dict[str, str]:
    """Channel name -> the flag's value (--data is the training channel)."""
    flags = {"training": "data", "validation": "validation", "pretrained": "pretrained",
             "model": "model"}
    return {c: getattr(args, flags[c]) for c in CHANNELS if getattr(args, flags[c], None)}


@dataclass
class TrainingPlan:
    """A checked CreateTrainingJob request and what must be done on AWS before it is sent."""

    request: dict[str, Any]
    image: str
    buckets: list[tuple[str, str]]  # (bucket, key prefix) the job writes to, checked first
    uploads: list[tuple[FolderListing, str]] = field(default_factory=list)  # folder, S3 prefix
    # Validation images the job will score; None when not known here (data on S3).
    validation_images: int | None = None
    # (bucket, region, account) of the SDK's default bucket, created when missing.
    default_bucket: tuple[str, str, str] | None = None


def plan_training(args: argparse.Namespace, *, out=sys.stdout, client_for=None) -> TrainingPlan:
    """Check everything on this machine: the flags, hyperparameters and image, the request,
    then the local data, whose content names its S3 prefix. Nothing is created or uploaded; the
    only AWS calls are the role's and the account's (identity.py; none with a role ARN, --image
    and --bucket)."""
    from ..hyperparameters import parse_hyperparameters
    from .upload import DATASETS, dataset_folder, list_folder
    from .validation import check_request

    check_flags(args)
    hyperparameters = read_hyperparameters(args.hyperparameters, args.set_values)
    channels = local_channels(args)
    check_job_choices(args, hyperparameters, channels)
    check_instance_type(args.instance_type)
    folders = check_folders(channels)
    local = bool(getattr(args, "local", False))
    if local:
        region = region_name(required=False) or "us-east-1"
        account = role_account(args.role) if args.role else "000000000000"
        role = args.role or f"arn:aws:iam::{account}:role/sm-effdet-local"
    else:
        from .identity import role_and_account

        region = region_name()
        # The role as the SDK resolves it; the account of these credentials (launch/identity.py).
        role, account = role_and_account(
            args.role, need_account=not (args.image and args.bucket), dry_run=args.dry_run,
            client_for=client_for, out=out,
        )
    image = args.image or default_image(account, region, getattr(args, "image_tag", None))
    if not local:  # a local run may use an image that was only built here (`docker run`)
        check_image(image)

    backbone = parse_hyperparameters(hyperparameters).backbone
    name = args.name or job_name(backbone)
    bucket = args.bucket or f"sagemaker-{region}-{account}"
    prefix = args.prefix
    use_files = local and not args.bucket
    if use_files:
        base = (Path.cwd() / "sm-effdet-output").resolve().as_uri()
        output, checkpoints, tensorboard = (
            f"{base}/jobs", f"{base}/checkpoints/{name}", f"{base}/tensorboard/{name}")
    else:
        output = s3_uri(bucket, prefix, "jobs")
        checkpoints = s3_uri(bucket, prefix, "checkpoints", name)
        tensorboard = s3_uri(bucket, prefix, "tensorboard", name)
    output = args.output_path or output
    checkpoints = args.checkpoint_s3_uri or checkpoints

    def make_request(uris: dict[str, str]) -> dict[str, Any]:
        request = build_training_request(
            name=name, role=role, image=image, channels=uris, output_path=output,
            hyperparameters=hyperparameters, checkpoint_uri=checkpoints,
            tensorboard_uri=tensorboard, instance_type=args.instance_type,
            instance_count=args.instance_count, volume_size=args.volume_size,
            input_mode=args.input_mode, spot=args.spot, max_run=args.max_run,
            max_wait=args.max_wait, network_isolation=args.network_isolation,
            subnets=args.subnet, security_groups=args.security_group,
            environment=dict(args.env), tags=dict(args.tag),
            augmented_manifest=attribute_names(args.augmented_manifest),
            output_kms_key=args.output_kms_key, volume_kms_key=args.volume_kms_key,
            keep_alive_period=args.keep_alive_period,
        )
        check_request("CreateTrainingJob", _as_s3(request) if local else request)
        return request

    def uri_of(channel_name: str, digest_folder: str) -> str:
        value = channels[channel_name]
        if channel_name not in folders:
            return value
        if local:
            return Path(value).resolve().as_uri()
        return s3_uri(bucket, prefix, DATASETS, digest_folder) + "/"

    # The request is checked first with a stand-in for the content digest (same shape), so that
    # a bad request is refused before the data is read and hashed.
    make_request({c: uri_of(c, "data-" + "0" * 12) for c in channels})
    # The data last of the local checks: reading a large annotation file takes the longest.
    validation_images = check_local_data(channels, hyperparameters, out=out)
    uploads: list[tuple[FolderListing, str]] = []
    uris: dict[str, str] = {}
    listings: dict[Path, FolderListing] = {}
    for channel_name in channels:
        if channel_name in folders and not local:
            folder = folders[channel_name].resolve()
            if folder not in listings:  # one folder given for two channels is hashed once
                listings[folder] = list_folder(folders[channel_name])
            listing = listings[folder]
            uris[channel_name] = uri_of(channel_name, dataset_folder(listing))
            if all(uri != uris[channel_name] for _, uri in uploads):
                uploads.append((listing, uris[channel_name]))
        else:
            uris[channel_name] = uri_of(channel_name, "")
    request = make_request(uris)
    written = [(bucket, prefix)] if not use_files else []
    for uri in (output, checkpoints):
        where, _, key = uri[len("s3://"):].partition("/")
        if is_s3(uri) and where not in [b for b, _ in written]:
            written.append((where, key))
    default = (bucket, region, account) if not args.bucket and not use_files else None
    return TrainingPlan(request=request, image=image, buckets=written, uploads=uploads,
                        validation_images=validation_images, default_bucket=default)


def carry_out(plan: TrainingPlan, *, s3, ecr: Callable[[str], Any] | None = None,
              sync: bool = False, out=sys.stdout) -> None:
    """What must hold on AWS before the job is created, in this order: the image is in ECR, the
    SDK's default bucket exists (created when missing), the buckets can be written, the datasets' prefixes hold nothing the folders lack (or, with
    `sync`, no longer do); then the local folders are uploaded."""
    from .upload import check_bucket, check_prefixes, upload_folder

    check_image_pushed(plan.image, ecr, out=out)
    if plan.default_bucket:
        from .identity import ensure_default_bucket

        bucket, region, account = plan.default_bucket
        ensure_default_bucket(s3, bucket, region=region, account=account, out=out)
    for bucket, prefix in plan.buckets:
        check_bucket(s3, bucket, prefix)
    check_prefixes(s3, plan.uploads, sync, out=out)
    for listing, uri in plan.uploads:
        upload_folder(s3, listing, uri, out=out)


def prepare_training_request(args: argparse.Namespace, *, s3=None,
                             ecr: Callable[[str], Any] | None = None,
                             out=sys.stdout, client_for=None) -> dict[str, Any]:
    """`plan_training`, then (unless a dry run or local) `carry_out`; returns the validated
    CreateTrainingJob request. `ecr(region)` makes an ECR client to check the image with; None
    leaves it unchecked (and says so)."""
    plan = plan_training(args, out=out, client_for=client_for)
    if args.dry_run:
        print(f"note: the image {plan.image} was not checked in ECR (--dry-run calls nothing).",
              file=sys.stderr)
        return plan.request
    if getattr(args, "local", False):
        return plan.request
    carry_out(plan, s3=s3, ecr=ecr, sync=getattr(args, "sync", False), out=out)
    return plan.request


def _as_s3(request: dict[str, Any]) -> dict[str, Any]:
    """The request with file:// URIs written as s3:// ones, to check the rest of it."""
    text = json.dumps(request).replace('"file:///', '"s3://local-file/')
    return json.loads(text)
