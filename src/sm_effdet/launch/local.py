"""`--local`: run a CreateTrainingJob request on this machine, as SageMaker would run it.

The same request dict a real job gets is checked, then turned into a fresh /opt/ml tree: the
config files SageMaker writes, the channels downloaded from S3 (or linked from local folders),
the checkpoints synced down. `train` runs from the checkout (or in the image with `docker run`),
its output streamed as it comes; afterwards model/ and output/ are archived and put where the
real job would put them, `<S3OutputPath>/<TrainingJobName>/output/`, and the checkpoints and
TensorBoard events are synced up. So a request can be tried before paying for it.

Local mode runs one host: a request for several instances is refused rather than faked.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import unquote, urlparse

from ..errors import UserInputError, shorten
from .upload import split_s3
from .validation import check_request

CONTAINER_BASE = "/opt/ml"
REPO = Path(__file__).resolve().parents[3]
HOST = "algo-1"
# SageMaker's name for the instance group of a job that gives no InstanceGroups.
GROUP = "homogeneousCluster"
# What a stand-in for a local URI looks like while the rest of the request is validated.
STAND_IN_BUCKET = "local-file"
# The job's shared memory: Docker's default (64 MB) is too small for PyTorch's data loaders;
# the same limit as `make local-train` (a ceiling, not memory set aside).
SHM_SIZE = "16g"


# --- Checking ----------------------------------------------------------------------------------


def check_local_request(request: Mapping[str, Any]) -> None:
    """`check_request`, with file:// URIs and local paths accepted where SageMaker takes S3 URIs
    (each stands in as s3://local-file/<its path> while the rest of the request is checked: the
    API's pattern refuses any other scheme), then what local mode refuses."""
    check_request("CreateTrainingJob", _with_stand_ins(request))
    refuse_unsupported(request)


def _with_stand_ins(request: Mapping[str, Any]) -> dict:
    request = copy.deepcopy(dict(request))

    def stand_in(holder: dict | None, key: str) -> None:
        if holder and isinstance(holder.get(key), str) and _scheme(holder[key]) == "file":
            holder[key] = f"s3://{STAND_IN_BUCKET}/" + _local_path(holder[key]).as_posix().lstrip("/")

    for channel in request.get("InputDataConfig") or []:
        stand_in(((channel or {}).get("DataSource") or {}).get("S3DataSource"), "S3Uri")
    stand_in(request.get("OutputDataConfig"), "S3OutputPath")
    stand_in(request.get("CheckpointConfig"), "S3Uri")
    stand_in(request.get("TensorBoardOutputConfig"), "S3OutputPath")
    return request


def refuse_unsupported(request: Mapping[str, Any]) -> None:
    """One sentence for each part of a valid request that this machine cannot honour."""
    resources = request.get("ResourceConfig") or {}
    count = resources.get("InstanceCount", 1)
    groups = resources.get("InstanceGroups") or []
    if groups:
        count = sum(group.get("InstanceCount", 0) for group in groups)
    if count != 1:
        raise UserInputError(
            f"local mode runs one host, but the request asks for {count} instances; set the "
            "instance count to 1 to try the job here (the multi-host layout is tested by "
            "tests/test_distributed.py, not by --local)."
        )
    job_mode = (request.get("AlgorithmSpecification") or {}).get("TrainingInputMode", "File")
    for channel in request.get("InputDataConfig") or []:
        name = channel["ChannelName"]
        source = channel["DataSource"].get("S3DataSource")
        if source is None:
            raise UserInputError(
                f"channel '{name}' reads from a file system (EFS or FSx), which local mode cannot "
                "mount; give it an s3:// URI or a local folder."
            )
        if channel.get("InputMode", job_mode) == "Pipe":
            raise UserInputError(
                f"channel '{name}' uses Pipe input mode, which cannot deliver image folders; set "
                "its input mode to File or FastFile."
            )
        if source["S3DataType"] == "AugmentedManifestFile":
            raise UserInputError(
                f"channel '{name}' is an AugmentedManifestFile, which needs Pipe input mode; "
                "give it an S3Prefix (a folder) instead."
            )
        _check_uri(source["S3Uri"], f"channel '{name}'")
        if source["S3DataType"] == "ManifestFile" and _scheme(source["S3Uri"]) != "s3":
            raise UserInputError(
                f"channel '{name}' is a ManifestFile at {shorten(source['S3Uri'])}, which local "
                "mode reads from S3 only; give the local folder itself as the channel."
            )
    _check_uri(request["OutputDataConfig"]["S3OutputPath"], "OutputDataConfig.S3OutputPath")
    for key, field in (("CheckpointConfig", "S3Uri"), ("TensorBoardOutputConfig", "S3OutputPath")):
        if request.get(key):
            _check_uri(request[key][field], f"{key}.{field}")
            local_path = request[key].get("LocalPath")
            if local_path and (
                not os.path.isabs(local_path)
                or os.path.relpath(local_path, CONTAINER_BASE).startswith("..")
            ):
                raise UserInputError(
                    f"{key}.LocalPath is {shorten(local_path)}, outside {CONTAINER_BASE}, which "
                    f"local mode cannot sync; use a folder under {CONTAINER_BASE}."
                )


def _check_uri(uri: str, what: str) -> None:
    if _scheme(uri) == "https":
        raise UserInputError(
            f"{what} is an https:// URL ({shorten(uri)}), which local mode does not read; "
            "write it as s3://BUCKET/KEY."
        )
    if _scheme(uri) == "s3" and not urlparse(uri).netloc:
        raise UserInputError(f"{what} ({shorten(uri)}) names no bucket; write it as s3://BUCKET/KEY.")


# --- URIs: s3://, file:// and plain paths --------------------------------------------------------


def _scheme(uri: str) -> str:
    """'s3', 'https' or 'file' (a file:// URI or a plain local path)."""
    scheme = urlparse(uri).scheme.lower()
    return scheme if scheme in ("s3", "https") else "file"


def _local_path(uri: str) -> Path:
    if uri.lower().startswith("file://"):
        return Path(unquote(urlparse(uri).path))
    return Path(uri).expanduser().absolute()


def _join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def _relative_key(key: str, folder: str) -> str | None:
    """`key` relative to `folder`, or None for a folder marker or a key that would climb out."""
    relative = key[len(folder):]
    normal = os.path.normpath(relative) if relative else ""
    if not relative or relative.endswith("/") or normal.startswith("..") or os.path.isabs(normal):
        return None
    return normal


def download_prefix(s3, uri: str, dest: Path) -> int:
    """Every object under the S3 prefix into `dest`, keeping the paths below the prefix's folder
    (as SageMaker does: s3://b/data/training/ gives dest/a.jpg, s3://b/data/train gives
    dest/train.../a.jpg). Returns the number of objects."""
    bucket, prefix = split_s3(uri)
    folder = prefix[: prefix.rfind("/") + 1]
    count = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            relative = _relative_key(item["Key"], folder)
            if relative is None:
                continue
            target = dest / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, item["Key"], str(target))
            count += 1
    return count


def download_manifest(s3, uri: str, dest: Path) -> int:
    """The objects a ManifestFile lists ([{"prefix": "s3://..."}, "relative/key", ...])."""
    bucket, key = split_s3(uri)
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    try:
        entries = json.loads(body)
        prefix = entries[0]["prefix"]
        relatives = entries[1:]
        assert all(isinstance(r, str) for r in relatives) and isinstance(prefix, str)
    except (ValueError, LookupError, TypeError, AssertionError):
        raise UserInputError(
            f"the manifest {shorten(uri)} is not a JSON list of a {{\"prefix\": \"s3://...\"}} "
            "object and relative keys; fix it or give the channel an S3Prefix."
        ) from None
    source_bucket, source_prefix = split_s3(prefix)
    for relative in relatives:
        normal = _relative_key(relative, "")
        if normal is None:
            raise UserInputError(
                f"the manifest {shorten(uri)} lists {shorten(relative)!r}, which is not a file "
                "below its prefix; list relative keys only."
            )
        target = dest / normal
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(source_bucket, source_prefix + relative, str(target))
    return len(relatives)


def upload_folder(s3, folder: Path, uri: str, delete: bool = False) -> int:
    """Every file under `folder` to the S3 prefix `uri`/; with `delete`, objects under the prefix
    that `folder` no longer has are removed (SageMaker's checkpoint sync does so)."""
    bucket, prefix = split_s3(_join(uri, ""))
    keys = set()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        key = prefix + path.relative_to(folder).as_posix()
        s3.upload_file(str(path), bucket, key)
        keys.add(key)
    if delete:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                if item["Key"] not in keys:
                    s3.delete_object(Bucket=bucket, Key=item["Key"])
    return len(keys)


def put_file(s3, path: Path, uri: str) -> None:
    if _scheme(uri) == "s3":
        bucket, key = split_s3(uri)
        s3.upload_file(str(path), bucket, key)
    else:
        target = _local_path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)


def sync_up(s3, folder: Path, uri: str, delete: bool = False) -> int:
    if _scheme(uri) == "s3":
        return upload_folder(s3, folder, uri, delete)
    target = _local_path(uri)
    if delete and target.exists():
        shutil.rmtree(target)
    shutil.copytree(folder, target, dirs_exist_ok=True)
    return sum(1 for p in folder.rglob("*") if p.is_file())


def sync_down(s3, uri: str, folder: Path) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    if _scheme(uri) == "s3":
        return download_prefix(s3, _join(uri, ""), folder)
    source = _local_path(uri)
    if not source.is_dir():
        return 0
    shutil.copytree(source, folder, dirs_exist_ok=True)
    return sum(1 for p in folder.rglob("*") if p.is_file())


# --- The tree ----------------------------------------------------------------------------------


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
        return (self.request.get("CheckpointConfig") or {}).get("LocalPath") or f"{CONTAINER_BASE}/checkpoints"

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
    """What the platform sets in a training container (TRAINING_JOB_NAME, the request's
    Environment), and the sagemaker-training toolkit's SM_* names scripts commonly read."""
    base = job.container_path(CONTAINER_BASE)
    channels = [c["ChannelName"] for c in job.request.get("InputDataConfig") or []]
    env = {
        "TRAINING_JOB_NAME": job.name,
        "SM_MODEL_DIR": f"{base}/model",
        "SM_OUTPUT_DATA_DIR": f"{base}/output/data",
        "SM_INPUT_CONFIG_DIR": f"{base}/input/config",
        "SM_CHANNELS": json.dumps(channels),
        "SM_CURRENT_HOST": HOST,
        "SM_HOSTS": json.dumps([HOST]),
        "PYTHONUNBUFFERED": "1",
        **{f"SM_CHANNEL_{c.upper()}": f"{base}/input/data/{c}" for c in channels},
    }
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
        if _scheme(uri) == "s3":
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
        folder = _local_path(uri)
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


def s3_uris(request: Mapping[str, Any]) -> list[str]:
    """Every URI of the request that local mode reads or writes."""
    uris = [c["DataSource"]["S3DataSource"]["S3Uri"] for c in request.get("InputDataConfig") or []]
    uris.append(request["OutputDataConfig"]["S3OutputPath"])
    uris += [(request.get("CheckpointConfig") or {}).get("S3Uri")]
    uris += [(request.get("TensorBoardOutputConfig") or {}).get("S3OutputPath")]
    return [uri for uri in uris if uri and _scheme(uri) == "s3"]


def default_s3_client():
    """For a caller that passes no client (the CLI passes its own): the boto3 way, with
    botocore's standard retry mode as the launcher's clients have."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", config=Config(retries={"mode": "standard"}))


# --- Running train -----------------------------------------------------------------------------


def python_with_torch() -> list[str]:
    """How to run ./train from the checkout: this Python when it has torch (a `uv run` or the
    checkout's own environment); else the checkout's .venv, which `make` and `uv sync` create
    with the whole training stack; else `uv run --frozen`, which creates that environment
    from the lock first (minutes, once). The launcher itself never imports torch."""
    if importlib.util.find_spec("torch") is not None:
        return [sys.executable]
    venv = REPO / ".venv" / "bin" / "python"
    if venv.exists():
        return [str(venv)]
    uv = shutil.which("uv")
    if uv:
        return [uv, "run", "--frozen", "--project", str(REPO), "python"]
    raise UserInputError(
        "this Python has no torch, the checkout has no .venv and uv is not installed; run "
        "`make install` (or `uv sync --frozen`) in the checkout, or give --image to train in the image."
    )


def gpus_available() -> bool:
    try:
        probe = subprocess.run(["nvidia-smi", "-L"], check=False, capture_output=True, timeout=20)
        return probe.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def docker_command(job: LocalJob, env: Mapping[str, str], gpus: bool) -> list[str]:
    """`docker run` as SageMaker starts the container: the tree as /opt/ml, `train` as the
    command, the job's environment, the GPUs when this machine has any."""
    command = ["docker", "run", "--rm", "--name", job.name, f"--shm-size={SHM_SIZE}"]
    if gpus:
        command += ["--gpus", "all"]
    if job.request.get("EnableNetworkIsolation"):
        command += ["--network", "none"]
    command += ["-v", f"{job.tree}:{CONTAINER_BASE}"]
    for source, target in job.mounts:
        command += ["-v", f"{source}:{target}:ro"]
    for key in env:
        command += ["-e", key]  # the value comes from docker's own environment, not argv
    return command + [job.image, "train"]


def train_command(job: LocalJob, env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    if job.image:
        return docker_command(job, env, gpus_available()), {**os.environ, **env}
    train = REPO / "train"
    if not train.exists():
        raise UserInputError(
            f"no ./train next to this package ({REPO}); run --local from a checkout, or give "
            "--image to train in the image."
        )
    return [*python_with_torch(), str(train)], {**os.environ, **env}


def run_streamed(command: list[str], env: Mapping[str, str], cwd: Path, out: TextIO) -> int:
    """Run `command`, its output (stdout and stderr together) written to `out` as it comes;
    SIGINT and SIGTERM sent here are passed on to it, so that train stops as SageMaker stops
    it (a checkpoint, then exit). Its own session: a Ctrl-C in the terminal reaches it once."""
    process = subprocess.Popen(
        command, env=dict(env), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def pass_on(signum, _frame) -> None:
        print(f"local mode: passing {signal.Signals(signum).name} on to train", file=out, flush=True)
        process.send_signal(signum)

    previous = {}
    if _is_main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, pass_on)
    try:
        for line in iter(process.stdout.readline, b""):
            out.write(line.decode("utf-8", errors="replace"))
            out.flush()
        return process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if process.poll() is None:
            process.kill()
            process.wait()


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# --- Afterwards --------------------------------------------------------------------------------


def make_archive(path: Path, members: list[tuple[Path, str]]) -> Path:
    """A .tar.gz holding each (source, name inside); a folder's contents go below its name
    ('' puts them at the archive's root, as SageMaker's model.tar.gz has them)."""
    with tarfile.open(path, "w:gz") as archive:
        for source, name in members:
            if source.is_dir():
                for child in sorted(source.iterdir()):
                    archive.add(child, arcname=f"{name}/{child.name}" if name else child.name)
            elif source.exists():
                archive.add(source, arcname=name or source.name)
    return path


def upload_results(job: LocalJob, code: int, s3) -> dict[str, str]:
    """model.tar.gz (a completed job only) and output.tar.gz at the real job's output path."""
    output_uri = _join(job.request["OutputDataConfig"]["S3OutputPath"], job.name, "output")
    archives = job.tree / "archives"
    archives.mkdir(exist_ok=True)
    written = {}
    model = job.tree / "model"
    if code == 0 and any(model.iterdir()):
        path = make_archive(archives / "model.tar.gz", [(model, "")])
        written["model"] = _join(output_uri, "model.tar.gz")
        put_file(s3, path, written["model"])
    output = job.tree / "output"
    members = [(output / "data", ""), (output / "failure", "failure")]
    path = make_archive(archives / "output.tar.gz", members)
    written["output"] = _join(output_uri, "output.tar.gz")
    put_file(s3, path, written["output"])
    return written


def sync_afterwards(job: LocalJob, s3, out: TextIO) -> None:
    checkpoint = job.request.get("CheckpointConfig")
    if checkpoint:
        folder = job.host_path(job.checkpoint_local_path)
        if folder.is_dir():
            count = sync_up(s3, folder, checkpoint["S3Uri"], delete=True)
            print(f"checkpoints: {count} files synced to {checkpoint['S3Uri']}", file=out, flush=True)
    tensorboard = job.request.get("TensorBoardOutputConfig")
    if tensorboard:
        folder = job.host_path(job.tensorboard_local_path)
        # Where SageMaker puts a job's events below the configured path.
        uri = _join(tensorboard["S3OutputPath"], job.name, "tensorboard-output")
        if folder.is_dir():
            count = sync_up(s3, folder, uri)
            print(f"tensorboard: {count} files to {uri}", file=out, flush=True)


# The best epoch's numbers a user compares first (model.json has every one).
SUMMARY_METRICS = ("valid_map", "valid_map_50", "valid_loss", "train_loss")


def summary(job: LocalJob, code: int, seconds: float, written: Mapping[str, str]) -> str:
    # 130 and 143: train stopped by SIGINT or SIGTERM, as StopTrainingJob stops a job.
    status = "Completed" if code == 0 else "Stopped" if code in (130, 143) else "Failed"
    lines = [f"local job {job.name}: {status} (train exited {code}) after {seconds:.0f} s"]
    failure = job.tree / "output" / "failure"
    if failure.exists():
        reason = failure.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        lines.append(f"failure reason: {reason[0] if reason else '(empty)'}")
    card = job.tree / "model" / "model.json"
    if code == 0 and card.exists():
        try:
            meta = json.loads(card.read_text())
            metrics = meta.get("metrics") or {}
            shown = " ".join(
                f"{k}={metrics[k]:.4g}" for k in SUMMARY_METRICS
                if isinstance(metrics.get(k), (int, float))
            )
            lines.append(f"best epoch {meta.get('best_epoch')}: {shown or '(no metrics)'}")
        except (OSError, ValueError, AttributeError):
            lines.append(f"model.json at {card} could not be read")
    report = job.tree / "output" / "data" / "report" / "index.html"
    if report.exists():
        lines.append(f"report: {report}")
    lines.append(f"model:  {written.get('model', '(none: the job did not complete)')}")
    lines.append(f"output: {written.get('output')}")
    lines.append(f"tree:   {job.tree}")
    return "\n".join(lines)


# --- The whole run -----------------------------------------------------------------------------


def run_local(
    request: dict,
    *,
    s3=None,
    work_dir: Path | None = None,
    image: str | None = None,
    out: TextIO = sys.stdout,
) -> int:
    """Run the CreateTrainingJob `request` here as SageMaker would; train's exit code."""
    check_local_request(request)
    if s3 is None and s3_uris(request):
        s3 = default_s3_client()
    job = LocalJob(request, new_tree(work_dir, request["TrainingJobName"]), image)
    print(f"local job {job.name}: /opt/ml is {job.tree}", file=out, flush=True)
    write_config_files(job)
    fetch_channels(job, s3, out)
    checkpoint = request.get("CheckpointConfig")
    if checkpoint:
        folder = job.host_path(job.checkpoint_local_path)
        count = sync_down(s3, checkpoint["S3Uri"], folder)
        print(f"checkpoints: {count} files from {checkpoint['S3Uri']}", file=out, flush=True)
    env = job_environment(job)
    command, process_env = train_command(job, env)
    print("local mode: " + " ".join(command), file=out, flush=True)
    if request.get("EnableNetworkIsolation") and not image:
        print("local mode: EnableNetworkIsolation is honoured only in the image (--image); from "
              "the checkout train can reach the network", file=out, flush=True)
    started = time.monotonic()
    code = run_streamed(command, process_env, job.tree, out)
    seconds = time.monotonic() - started
    written = upload_results(job, code, s3)
    sync_afterwards(job, s3, out)
    print(summary(job, code, seconds, written), file=out, flush=True)
    return code
