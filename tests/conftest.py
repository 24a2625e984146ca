"""Shared helpers: /opt/ml trees with generated data, and running the real ./train."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sm_effdet.demo import make_shapes_dataset

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "train"

# Small and fast on a CPU, still a real EfficientDet through effdet and Lightning.
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
