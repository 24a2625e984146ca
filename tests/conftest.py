"""Shared helpers: /opt/ml trees with generated data, and running the real ./train."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "train"

# Where the environment says not to write bytecode (PYTHONDONTWRITEBYTECODE), each of the
# suite's ~100 ./train, ./serve and sm-effdet processes compiled the ~2,300 modules of torch,
# Lightning, timm and the rest from source again: about 4 of a tiny job's 20 CPU seconds.
# The tests keep the compiled copies in a folder of their own under the temporary directory
# instead (never beside the sources or in the environment; each copy is checked against its
# source's time and size, as Python always does), reused by the next run.
if sys.flags.dont_write_bytecode and not os.environ.get("PYTHONPYCACHEPREFIX"):
    _PYCACHE = Path(tempfile.gettempdir()) / f"sm-effdet-tests-pycache-{os.getuid()}"
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(_PYCACHE)
    sys.dont_write_bytecode = False  # this process too: the test modules import torch
    sys.pycache_prefix = str(_PYCACHE)

from sm_effdet.demo import make_shapes_dataset  # noqa: E402

# Under pytest-xdist each worker's ./train gets its share of the CPUs: torch's default of a
# thread per core, in two workers' ./train at once, made the suite's CPU time 40% larger
# (threads waiting on each other) and its longest test 3.5 times slower. serve sets its own
# thread count (every CPU), and the tests that compare it with inference.py need both alike.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
TRAIN_THREADS = (
    {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))}
    if _WORKERS > 1 else {}
)

# Files whose tests take longest (several ./train runs each) are handed to the workers first, so
# that no worker starts one of them when the others are nearly done (`--dist loadfile` takes
# files in collection order).
SLOW_FILES = (
    "test_recipe.py", "test_gpu_check.py", "test_train_job.py", "test_stops.py",
    "test_export.py", "test_local_mode.py", "test_resilience.py", "test_hardening_train.py",
)


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))  # stable: file order kept

# The network guard: this process and every Python process a test starts refuse connections
# outside loopback (tests/netguard/sitecustomize.py; tests/test_network_guard.py checks it).
NETGUARD = Path(__file__).resolve().parent / "netguard"
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(NETGUARD), os.environ.get("PYTHONPATH", "")) if p
)
sys.path.insert(0, str(NETGUARD))
import sitecustomize  # noqa: E402,F401  (the guard; a no-op if site already loaded it)

if not hasattr(sitecustomize, "OutsideConnectionError"):  # another sitecustomize came first
    import importlib.util

    _spec = importlib.util.spec_from_file_location("netguard", NETGUARD / "sitecustomize.py")
    _spec.loader.exec_module(importlib.util.module_from_spec(_spec))

# Small and fast on a CPU, still a real EfficientDet through effdet and Lightning.

def sigint_as_a_terminal_sends_it() -> None:
    """preexec_fn for a child a test sends SIGINT to: the default disposition, unblocked, as in a
    shell. A pytest-xdist worker may carry SIGINT ignored or blocked from libraries an earlier test
    ran in it, and a child inherits both across exec (Python then never raises KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

FAST = {
    "backbone": "tf_lite0",
    "img_size": "256",
    "batch_size": "8",
    "epochs": "1",
    "pretrained": "false",
    "num_workers": "0",
    # The ONNX export adds tens of seconds to every job; tests/test_export.py turns it on.
    "export_onnx": "false",
}


def write_tree(
    base: Path,
    hyperparameters: dict,
    n_images: int = 24,
    validation_images: int = 0,
    input_mode: str = "File",
) -> Path:
    make_shapes_dataset(base / "input" / "data" / "training", n_images=n_images)
    channels = ["training"]
    if validation_images:
        make_shapes_dataset(
            base / "input" / "data" / "validation", n_images=validation_images, seed=1,
            first_id=10_000,
        )
        channels.append("validation")
    config = base / "input" / "config"
    config.mkdir(parents=True, exist_ok=True)
    (config / "hyperparameters.json").write_text(json.dumps(hyperparameters))
    (config / "inputdataconfig.json").write_text(
        json.dumps({c: {"TrainingInputMode": input_mode} for c in channels})
    )
    return base


def train_env(base: Path, **extra: str) -> dict[str, str]:
    """./train's environment: the tree at `base`, offline, on the CPU."""
    return {
        **os.environ,
        "SAGEMAKER_BASE_DIR": str(base),
        "CUDA_VISIBLE_DEVICES": "",
        # Any download attempt fails fast, as in a network-isolated job.
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "TORCH_HOME": str(base / "torch-home"),
        "PYTHONUNBUFFERED": "1",
        **TRAIN_THREADS,
        **extra,
    }


def run_train(base: Path, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """Run ./train to the end as SageMaker would."""
    return subprocess.run(
        [sys.executable, str(TRAIN)], env=train_env(base, **env), capture_output=True,
        text=True, timeout=timeout, cwd=base,
    )


def start_train(base: Path, **env: str) -> subprocess.Popen:
    """Start ./train in the background, stdout and stderr together, to signal or pair it."""
    return subprocess.Popen(
        [sys.executable, str(TRAIN)], env=train_env(base, **env), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, cwd=base,
    )


def failure_text(base: Path) -> str:
    return (base / "output" / "failure").read_text()


def model_files(base: Path) -> list[str]:
    model = base / "model"
    return sorted(p.name for p in model.iterdir()) if model.exists() else []


@pytest.fixture
def tree(tmp_path: Path):
    def make(hyperparameters: dict, **kwargs) -> Path:
        return write_tree(tmp_path / "opt_ml", hyperparameters, **kwargs)

    return make


# The session's trained model: tests/test_recipe.py warm-starts from it on the same 16 images
# and checks its EMA weights (effdet's decay), so both are part of it.
TRAINED_MODEL_HP = {**FAST, "val_fraction": "0.25", "ema_decay": "0.9998"}
TRAINED_MODEL_IMAGES = 16


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory, worker_id) -> Path:
    """A model folder written by the real ./train (tiny: FAST, 1 epoch, EMA of the weights),
    shared by the session: tests/test_serve.py, test_serve_hardening.py and test_exif.py serve
    it, tests/test_recipe.py starts from it. With several pytest-xdist workers the first to need
    it trains it in the folder they share and the others wait for it (xdist's own recipe)."""
    if worker_id == "master":  # one process: no one to share with
        return _train_shared_model(tmp_path_factory.mktemp("serve"))
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent / "trained_model"
    with FileLock(str(shared) + ".lock"):
        if not (shared / "opt_ml" / "model" / "model.json").is_file():
            shutil.rmtree(shared, ignore_errors=True)
            shared.mkdir()
            _train_shared_model(shared)
    return shared / "opt_ml"


def _train_shared_model(folder: Path) -> Path:
    base = write_tree(folder / "opt_ml", TRAINED_MODEL_HP, n_images=TRAINED_MODEL_IMAGES)
    result = run_train(base)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return base


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (pyproject.toml's addopts): a worker per CPU, at most 4: each test's ./train or
    serve uses the CPUs too, and beyond 4 workers the suite's longest file sets its time."""
    return max(1, min(os.cpu_count() or 1, 4))


# --- An AWS emulator on loopback (moto's server: S3, SageMaker, CloudWatch Logs) -------------
# moto's SageMaker is shallow (shared/docs/sagemaker-launch-facts.md): a job is Completed at
# once, its metrics and times are made up, nothing is written to S3. Tests that use it are
# emulated tests: they assert what the launcher sends and what moto's S3 and Logs really hold.

AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(scope="session")
def moto_endpoint():
    """The emulator's URL, started once per test session on 127.0.0.1."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def aws(moto_endpoint, monkeypatch, tmp_path):
    """A clean emulator and an environment that points boto3 (in this process and in the
    processes a test starts) at it, with fake credentials and no config files."""
    import requests

    requests.post(f"{moto_endpoint}/moto-api/reset", timeout=10).raise_for_status()
    for key in list(os.environ):
        if key.startswith("AWS_"):
            monkeypatch.delenv(key)
    for key, value in AWS_TEST_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    return moto_endpoint


def push_image(image: str) -> None:
    """Put an image under `image`'s repository and tag into the emulator's ECR, as `make push`
    would (a manifest without layers: moto keeps what ECR's DescribeImages answers with); the
    launcher refuses an image ECR does not hold."""
    import boto3

    from sm_effdet.launch.images import ECR_URI

    match = ECR_URI.fullmatch(image)
    ecr = boto3.client("ecr", region_name=match["region"])
    try:
        ecr.create_repository(repositoryName=match["repository"])
    except ecr.exceptions.RepositoryAlreadyExistsException:
        pass
    manifest = {
        "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": 2,
                   "digest": "sha256:" + "0" * 64},
        "layers": [],
    }
    ecr.put_image(repositoryName=match["repository"], imageManifest=json.dumps(manifest),
                  imageTag=match["tag"])
