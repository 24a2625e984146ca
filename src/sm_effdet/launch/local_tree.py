"""Local mode's /opt/ml tree: what SageMaker gives a training container, made in a folder here.

A fresh tree per job (`new_tree`), the config files SageMaker writes in input/config, the
environment the platform sets, the channels in input/data
(downloaded from S3, or linked or mounted from local folders) and the checkpoints synced down.
`LocalJob` maps a path as the job sees it to the tree, from the checkout and in the image alike.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from ..errors import UserInputError, shorten
from .local_transfer import (
    download_manifest,
    download_prefix,
    local_path_of,
    sync_down,
    uri_scheme,
)

CONTAINER_BASE = "/opt/ml"
HOST = "algo-1"
# SageMaker's name for the instance group of a job that gives no InstanceGroups.
GROUP = "homogeneousCluster"


class LocalJob:
    """One run of a request: where its tree is and how paths inside the container map to it."""

    def __init__(self, request: Mapping[str, Any], tree: Path, image: str | None) -> None:
        self.request = request
        self.name = request["TrainingJobName"]
        self.tree = tree
        self.image = image
        # Local folders given as channels, mounted read-only into the container (image mode).
        self.mounts: list[tuple[Path, str]] = []

    def container_path(self, path: str) -> str:
        """A path as the job sees it: unchanged in the image; below the tree from the checkout,
        where /opt/ml is `tree` (the SAGEMAKER_BASE_DIR train reads)."""
        if self.image:
            return path
        return str(self.host_path(path))

    def host_path(self, path: str) -> Path:
        # refuse_unsupported has made sure that `path` lies under /opt/ml.
        return self.tree / os.path.relpath(path, CONTAINER_BASE)

    @property
    def checkpoint_local_path(self) -> str:
        config = self.request.get("CheckpointConfig") or {}
        return config.get("LocalPath") or f"{CONTAINER_BASE}/checkpoints"

    @property
    def tensorboard_local_path(self) -> str:
        config = self.request.get("TensorBoardOutputConfig") or {}
        return config.get("LocalPath") or f"{CONTAINER_BASE}/output/tensorboard"


def new_tree(work_dir: Path | None, name: str) -> Path:
    """A fresh, empty folder for the job's /opt/ml: never one a previous run has filled."""
    base = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="sm-effdet-local-"))
    tree = base / name
    if tree.exists() and any(tree.iterdir()):
        raise UserInputError(
            f"{tree} already holds a job's files; give the job a new name or another work folder."
        )
    for folder in ("input/config", "input/data", "model", "output/data"):
        (tree / folder).mkdir(parents=True, exist_ok=True)
    return tree


def input_data_config(request: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """inputdataconfig.json as SageMaker writes it: per channel its input mode, distribution
    and record wrapping, and its content type when the request gives one."""
    job_mode = request["AlgorithmSpecification"].get("TrainingInputMode", "File")
    config = {}
    for channel in request.get("InputDataConfig") or []:
        source = channel["DataSource"]["S3DataSource"]
        entry = {
            "TrainingInputMode": channel.get("InputMode", job_mode),
            "S3DistributionType": source.get("S3DataDistributionType", "FullyReplicated"),
            "RecordWrapperType": channel.get("RecordWrapperType", "None"),
        }
        if channel.get("ContentType"):
            entry["ContentType"] = channel["ContentType"]
        config[channel["ChannelName"]] = entry
    return config


def resource_config(request: Mapping[str, Any]) -> dict[str, Any]:
    """resourceconfig.json for the one host of a local run."""
    resources = request.get("ResourceConfig") or {}
    groups = resources.get("InstanceGroups") or []
    group = groups[0]["InstanceGroupName"] if groups else GROUP
    instance_type = groups[0]["InstanceType"] if groups else resources.get("InstanceType", "local")
    return {
        "current_host": HOST,
        "current_instance_type": instance_type,
        "current_group_name": group,
        "hosts": [HOST],
        "instance_groups": [
            {"instance_group_name": group, "instance_type": instance_type, "hosts": [HOST]}
        ],
        "network_interface_name": "eth0",
    }


def write_config_files(job: LocalJob) -> None:
    request, config = job.request, job.tree / "input" / "config"

    def write(name: str, value: Any) -> None:
        (config / name).write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")

    # The API takes strings only, so the file holds exactly the strings the request sends.
    write("hyperparameters.json", dict(request.get("HyperParameters") or {}))
    write("inputdataconfig.json", input_data_config(request))
    write("resourceconfig.json", resource_config(request))
    if request.get("CheckpointConfig"):
        write("checkpointconfig.json", {
            "LocalPath": job.container_path(job.checkpoint_local_path),
            "S3Uri": request["CheckpointConfig"]["S3Uri"],
        })


def job_environment(job: LocalJob) -> dict[str, str]:
    """What the platform sets in a training container: TRAINING_JOB_NAME and the request's
    Environment. No SM_* variables: those are the sagemaker-training toolkit's, which this
    image does not carry, and the job reads its channels from inputdataconfig.json."""
    base = job.container_path(CONTAINER_BASE)
    env = {"TRAINING_JOB_NAME": job.name, "PYTHONUNBUFFERED": "1"}
    if not job.image:
        env["SAGEMAKER_BASE_DIR"] = base
    env.update(job.request.get("Environment") or {})
    return env


def fetch_channels(job: LocalJob, s3, out: TextIO) -> None:
    """Each channel into input/data/<name>: S3 objects downloaded (File and FastFile alike);
    a local folder linked (from the checkout) or mounted read-only (in the image), never copied.
    The link keeps the job inside that folder: train resolves a channel's real path and refuses
    images whose real path lies outside it, as it does for any symlink in a channel."""
    for channel in job.request.get("InputDataConfig") or []:
        name = channel["ChannelName"]
        source = channel["DataSource"]["S3DataSource"]
        uri, target = source["S3Uri"], job.tree / "input" / "data" / name
        if uri_scheme(uri) == "s3":
            target.mkdir(parents=True, exist_ok=True)
            if source["S3DataType"] == "ManifestFile":
                count = download_manifest(s3, uri, target)
            else:
                count = download_prefix(s3, uri, target)
            if not count:
                raise UserInputError(
                    f"channel '{name}' has no objects under {shorten(uri, 200)}; upload the data "
                    "there or fix the channel's S3 URI."
                )
            print(f"channel {name}: {count} objects from {uri}", file=out, flush=True)
            continue
        folder = local_path_of(uri)
        if not folder.exists():
            raise UserInputError(
                f"channel '{name}' points to {shorten(str(folder), 200)}, which does not exist; "
                "give an existing folder."
            )
        if job.image:
            target.mkdir(parents=True, exist_ok=True)
            mount_at = f"{CONTAINER_BASE}/input/data/{name}"
            if folder.is_file():
                mount_at += "/" + folder.name
            job.mounts.append((folder.resolve(), mount_at))
            how = f"mounted read-only at {mount_at}"
        elif folder.is_file():
            target.mkdir(parents=True, exist_ok=True)
            (target / folder.name).symlink_to(folder.resolve())
            how = f"linked as {target / folder.name}"
        else:
            target.symlink_to(folder.resolve(), target_is_directory=True)
            how = f"linked as {target}"
        print(f"channel {name}: {folder} {how}", file=out, flush=True)


def fetch_checkpoints(job: LocalJob, s3, out: TextIO) -> None:
    """The checkpoints a previous run left at CheckpointConfig.S3Uri, synced down into the
    checkpoint folder, so that train resumes as it would on SageMaker."""
    checkpoint = job.request.get("CheckpointConfig")
    if checkpoint:
        folder = job.host_path(job.checkpoint_local_path)
        count = sync_down(s3, checkpoint["S3Uri"], folder)
        print(f"checkpoints: {count} files from {checkpoint['S3Uri']}", file=out, flush=True)
