"""`--local`: run a CreateTrainingJob request on this machine, as SageMaker would run it.

The same request dict a real job gets is checked, then turned into a fresh /opt/ml tree: the
config files SageMaker writes, the channels downloaded from S3 (or linked from local folders),
the checkpoints synced down. `train` runs from the checkout (or in the image with `docker run`),
its output streamed as it comes; afterwards model/ and output/ are archived and put where the
real job would put them, `<S3OutputPath>/<TrainingJobName>/output/`, and the checkpoints and
TensorBoard events are synced up. So a request can be tried before paying for it.

Local mode runs one host: a request for several instances is refused rather than faked.

Here: the checks, running train and what comes afterwards, and `run_local`, which tells the
whole run; the tree is made by local_tree.py, the files move through local_transfer.py.
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
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlparse

from ..errors import UserInputError, shorten
from .folders import check_output_folder
from .local_transfer import (
    default_s3_client,
    join_uri,
    local_path_of,
    put_file,
    s3_uris,
    sync_up,
    uri_scheme,
)
from .local_tree import (
    CONTAINER_BASE,
    LocalJob,
    fetch_channels,
    fetch_checkpoints,
    job_environment,
    new_tree,
    write_config_files,
)
from .validation import check_request

REPO = Path(__file__).resolve().parents[3]
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
        if holder and isinstance(holder.get(key), str) and uri_scheme(holder[key]) == "file":
            path = local_path_of(holder[key]).as_posix().lstrip("/")
            holder[key] = f"s3://{STAND_IN_BUCKET}/" + path

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
        if source["S3DataType"] == "ManifestFile" and uri_scheme(source["S3Uri"]) != "s3":
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


def check_local_targets(request: Mapping[str, Any]) -> None:
    """Every local folder the run writes into afterwards (the model, output, checkpoints,
    TensorBoard) can be written, checked before training: afterwards the model has nowhere to go."""
    name = request["TrainingJobName"]
    targets = [("the output folder", request["OutputDataConfig"]["S3OutputPath"], (name, "output"))]
    if request.get("CheckpointConfig"):
        targets.append(("the checkpoint folder", request["CheckpointConfig"]["S3Uri"], ()))
    if request.get("TensorBoardOutputConfig"):
        targets.append(("the TensorBoard folder",
                        request["TensorBoardOutputConfig"]["S3OutputPath"], (name,)))
    for what, uri, below in targets:
        if uri_scheme(uri) == "file":
            check_output_folder(local_path_of(uri).joinpath(*below), what)


def _check_uri(uri: str, what: str) -> None:
    if uri_scheme(uri) == "https":
        raise UserInputError(
            f"{what} is an https:// URL ({shorten(uri)}), which local mode does not read; "
            "write it as s3://BUCKET/KEY."
        )
    if uri_scheme(uri) == "s3" and not urlparse(uri).netloc:
        raise UserInputError(f"{what} ({shorten(uri)}) names no bucket; write it as s3://BUCKET/KEY.")


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
        "`make install` (or `uv sync --frozen`) in the checkout, or give --image to train in "
        "the image."
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
        name = signal.Signals(signum).name
        print(f"local mode: passing {name} on to train", file=out, flush=True)
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
    output_uri = join_uri(job.request["OutputDataConfig"]["S3OutputPath"], job.name, "output")
    archives = job.tree / "archives"
    archives.mkdir(exist_ok=True)
    written = {}
    model = job.tree / "model"
    if code == 0 and any(model.iterdir()):
        path = make_archive(archives / "model.tar.gz", [(model, "")])
        written["model"] = join_uri(output_uri, "model.tar.gz")
        put_file(s3, path, written["model"])
    output = job.tree / "output"
    members = [(output / "data", ""), (output / "failure", "failure")]
    path = make_archive(archives / "output.tar.gz", members)
    written["output"] = join_uri(output_uri, "output.tar.gz")
    put_file(s3, path, written["output"])
    return written


def sync_afterwards(job: LocalJob, s3, out: TextIO) -> None:
    checkpoint = job.request.get("CheckpointConfig")
    if checkpoint:
        folder = job.host_path(job.checkpoint_local_path)
        if folder.is_dir():
            count = sync_up(s3, folder, checkpoint["S3Uri"], delete=True)
            print(
                f"checkpoints: {count} files synced to {checkpoint['S3Uri']}", file=out, flush=True
            )
    tensorboard = job.request.get("TensorBoardOutputConfig")
    if tensorboard:
        folder = job.host_path(job.tensorboard_local_path)
        # Where SageMaker puts a job's events below the configured path.
        uri = join_uri(tensorboard["S3OutputPath"], job.name, "tensorboard-output")
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
    check_local_targets(request)
    if s3 is None and s3_uris(request):
        s3 = default_s3_client()
    job = LocalJob(request, new_tree(work_dir, request["TrainingJobName"]), image)
    print(f"local job {job.name}: /opt/ml is {job.tree}", file=out, flush=True)
    write_config_files(job)
    fetch_channels(job, s3, out)
    fetch_checkpoints(job, s3, out)
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
