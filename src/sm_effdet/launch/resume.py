"""`train --resume-from JOB`: a new job that goes on from a stopped or failed job's checkpoints.

SageMaker copies CheckpointConfig.S3Uri into the checkpoint folder when a job starts, and the
job resumes from the newest checkpoint it finds there (training/checkpoints.py; it refuses one
made for another backbone, image size or classes). So resuming is a new job (SageMaker never
restarts an ended one) with the old job's CheckpointConfig and, unless a flag on the command
line says otherwise, its hyperparameters, channels, image, role, resources, spot and stopping
settings, VPC, environment, tags and output path: what SageMaker's `Estimator.attach` gives.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import UserInputError, shorten
from ..hyperparameters import PLATFORM_KEY_PREFIX, PLATFORM_KEYS, parse_hyperparameters

# Channel name -> the train flag (dest) that gives it.
CHANNEL_FLAGS = {"training": "data", "validation": "validation", "pretrained": "pretrained",
                 "model": "model"}
# The job's checkpoint file names (training/checkpoints.py: checkpoint-HOST-epochN-stepN.ckpt).
CHECKPOINT_FILE = re.compile(r"^checkpoint-.+\.ckpt$")


def is_trial(description: Mapping[str, Any]) -> bool:
    return bool(description.get("TuningJobArn")) or "_tuning_objective_metric" in (
        description.get("HyperParameters") or {})


def checkpoint_uri(description: Mapping[str, Any]) -> str | None:
    """Where the job's own checkpoints are: CheckpointConfig.S3Uri, or for a tuning trial the
    folder below it named by the trial (job.trial_checkpoint_dir), ending in '/'."""
    uri = (description.get("CheckpointConfig") or {}).get("S3Uri")
    if not uri:
        return None
    uri = uri.rstrip("/") + "/"
    return f"{uri}{description['TrainingJobName']}/" if is_trial(description) else uri


def count_checkpoints(s3, uri: str) -> int:
    """The checkpoint files directly in the `uri` folder (a trial's subfolders not counted)."""
    from .upload import split_s3

    bucket, prefix = split_s3(uri)
    count = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            rest = item["Key"][len(prefix):]
            count += "/" not in rest and bool(CHECKPOINT_FILE.match(rest))
    return count


def resume_hint(description: Mapping[str, Any], s3) -> str:
    """What to say after a job ended Stopped or Failed: where its checkpoints are and the exact
    command that resumes it (a clause starting with '; '), or '' when it had no CheckpointConfig."""
    uri = checkpoint_uri(description)
    if not uri:
        return ""
    command = f"`sm-effdet train --resume-from {description['TrainingJobName']}`"
    try:
        found = count_checkpoints(s3, uri) if s3 is not None else None
    except Exception:  # noqa: BLE001 - the hint must not hide why the job ended
        found = None
    if found is None:
        return f"; its checkpoints, if it wrote any, are in {uri}: resume it with {command}"
    if found == 0:
        # A failure's own reason is what matters; a stop was wanted, so say why not to resume.
        if description.get("TrainingJobStatus") != "Stopped":
            return ""
        return f"; it left no checkpoint in {uri}, so a new job would start from the beginning"
    return f"; its checkpoints are in {uri}: resume it with {command}"


def given_flags(args: argparse.Namespace, add_arguments: Callable[[argparse.ArgumentParser], None]) -> set[str]:
    """The dests of the flags on the command line (not left at their defaults): the command's
    own arguments parsed again with every default suppressed."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    dests = vars(parser.parse_args([]))
    argv = getattr(args, "argv", None)
    if argv is None:  # called without the CLI: a value that differs from its default was given
        return {d for d, default in dests.items() if getattr(args, d, default) != default}
    # Not set_defaults(): that also writes the SUPPRESS marker into the namespace.
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    given, _ = parser.parse_known_args(argv[1:])
    return set(vars(given))


def _job_hyperparameters(description: Mapping[str, Any]) -> dict[str, str]:
    # SageMaker's own keys (a trial's _tuning_objective_metric) would make the new job a trial,
    # which checkpoints in a folder of its own and would not find the old checkpoints.
    return {k: v for k, v in (description.get("HyperParameters") or {}).items()
            if not k.startswith(PLATFORM_KEY_PREFIX) and k not in PLATFORM_KEYS}


class Resume:
    """The old job, what it gives the new one's flags (`fill`) and its request (`apply`)."""

    def __init__(self, description: Mapping[str, Any], tags: list[dict[str, str]], count: int):
        self.description = description
        self.job = description["TrainingJobName"]
        self.tags = [t for t in tags if not t["Key"].startswith("aws:")]
        self.checkpoints = count
        self.channels: dict[str, dict] = {}
        self.output: dict | None = None
        self.checkpoint: dict | None = None
        self.resources: dict = {}

    def fill(self, args: argparse.Namespace, given: set[str]) -> None:
        """Set every flag not on the command line from the old job."""
        from .request import read_hyperparameters

        d = self.description
        old = _job_hyperparameters(d)
        try:
            parse_hyperparameters(old)
        except UserInputError as exc:
            raise UserInputError(f"training job {self.job}'s hyperparameters are refused by "
                                 f"this version: {str(exc).rstrip('.')}.") from None
        # Precedence: the old job's, then --hyperparameters FILE, then --set.
        from_file = read_hyperparameters(args.hyperparameters, []) if "hyperparameters" in given else {}
        args.hyperparameters = None
        args.set_values = [*old.items(), *from_file.items(), *args.set_values]
        self._check_status(old, dict(args.set_values))

        for entry in d.get("InputDataConfig") or []:
            name = entry["ChannelName"]
            if name not in CHANNEL_FLAGS:
                raise UserInputError(
                    f"training job {self.job} has a channel '{shorten(name)}', which train cannot "
                    "give a job; resume it with the AWS CLI or SageMaker SDK instead."
                )
            if CHANNEL_FLAGS[name] not in given:
                source = entry["DataSource"].get("S3DataSource") or {}
                setattr(args, CHANNEL_FLAGS[name], source.get("S3Uri"))
                # Kept as the old job had it (manifest type, distribution, content type...).
                self.channels[name] = entry
                if source.get("AttributeNames") and "augmented_manifest" not in given:
                    args.augmented_manifest = ",".join(source["AttributeNames"])
        algorithm = d.get("AlgorithmSpecification") or {}
        resources = d.get("ResourceConfig") or {}
        stopping = d.get("StoppingCondition") or {}
        vpc = d.get("VpcConfig") or {}
        carried = {
            "role": d.get("RoleArn"),
            "input_mode": algorithm.get("TrainingInputMode"),
            "instance_type": resources.get("InstanceType"),
            "instance_count": resources.get("InstanceCount"),
            "volume_size": resources.get("VolumeSizeInGB"),
            "spot": bool(d.get("EnableManagedSpotTraining")),
            "max_run": stopping.get("MaxRuntimeInSeconds"),
            "network_isolation": bool(d.get("EnableNetworkIsolation")),
        }
        for dest, value in carried.items():
            if dest not in given and value is not None:
                setattr(args, dest, value)
        if not given & {"image", "image_tag"}:
            args.image = algorithm.get("TrainingImage")
        if args.spot and not given & {"max_run", "max_wait", "spot"}:
            args.max_wait = stopping.get("MaxWaitTimeInSeconds")
        if not given & {"subnet", "security_group"}:
            args.subnet = list(vpc.get("Subnets") or [])
            args.security_group = list(vpc.get("SecurityGroupIds") or [])
        args.env = [*(d.get("Environment") or {}).items(), *args.env]
        args.tag = [*((t["Key"], t["Value"]) for t in self.tags), *args.tag]
        # Extra resource settings no flag sets (a warm pool, a volume key) stay as they were.
        self.resources = {k: v for k, v in resources.items() if k != "InstanceGroups"}
        output = d.get("OutputDataConfig") or {}
        if not given & {"bucket", "prefix", "output_path"} and output.get("S3OutputPath"):
            from .upload import split_s3

            # The old job's bucket also holds the new uploads and TensorBoard events.
            bucket, key = split_s3(output["S3OutputPath"])
            args.bucket = bucket
            if key.rstrip("/").endswith("/jobs"):
                args.prefix = key.rstrip("/")[: -len("/jobs")]
            self.output = dict(output)
        if getattr(args, "checkpoint_s3_uri", None) is None:
            self.checkpoint = {**d["CheckpointConfig"], "S3Uri": checkpoint_uri(d)}

    def _check_status(self, old: dict[str, str], new: dict[str, str]) -> None:
        status = self.description["TrainingJobStatus"]
        if status in ("InProgress", "Stopping"):
            raise UserInputError(
                f"training job {self.job} is still {status}; two jobs would write the same "
                f"checkpoints: stop it with `sm-effdet stop {self.job}`, wait until it is "
                "Stopped, then resume it."
            )
        if status == "Completed":
            before, after = parse_hyperparameters(old).epochs, parse_hyperparameters(new).epochs
            if after <= before:
                raise UserInputError(
                    f"training job {self.job} Completed its {before} epochs, so resuming it "
                    f"trains nothing more; raise them with --set epochs=N (N > {before}) to "
                    "train longer."
                )

    def apply(self, request: dict[str, Any]) -> dict[str, Any]:
        """The new job's request with the old job's checkpoints and what `fill` kept; checked."""
        from .validation import check_request

        request["InputDataConfig"] = [self.channels.get(c["ChannelName"], c)
                                      for c in request["InputDataConfig"]]
        if self.checkpoint:
            request["CheckpointConfig"] = self.checkpoint
        if self.output:
            request["OutputDataConfig"] = self.output
        request["ResourceConfig"] = {**self.resources, **request["ResourceConfig"]}
        check_request("CreateTrainingJob", request)
        return request

    def describe(self, request: Mapping[str, Any]) -> str:
        uri = request["CheckpointConfig"]["S3Uri"]
        files = (f"the {self.checkpoints} checkpoint file{'s' if self.checkpoints != 1 else ''} in"
                 if uri == checkpoint_uri(self.description) else "the checkpoints in")
        return (f"resuming training job {self.job} ({self.description['TrainingJobStatus']}) as "
                f"{request['TrainingJobName']}, from {files} {uri}")


def load(job: str, *, sagemaker, s3) -> Resume:
    """The job to resume, refused when it has no checkpoints to resume from."""
    from .aws import named

    with named("training job", job, sagemaker.meta.region_name,
               "aws sagemaker list-training-jobs --sort-by CreationTime"):
        description = sagemaker.describe_training_job(TrainingJobName=job)
    uri = checkpoint_uri(description)
    if not uri:
        raise UserInputError(
            f"training job {job} has no CheckpointConfig, so it left nothing to resume from; "
            "start a new job with train (this launcher always sets one)."
        )
    count = count_checkpoints(s3, uri)
    if count == 0 and description["TrainingJobStatus"] not in ("InProgress", "Stopping"):
        raise UserInputError(
            f"training job {job} left no checkpoint in {uri} (it ended before its first one); "
            "start it again with train, without --resume-from."
        )
    tags = [tag for page in sagemaker.get_paginator("list_tags").paginate(
        ResourceArn=description["TrainingJobArn"]) for tag in page.get("Tags", [])]
    return Resume(description, tags, count)
