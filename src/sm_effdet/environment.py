"""The SageMaker training environment: /opt/ml paths, channels and the config files.

Every path derives from SAGEMAKER_BASE_DIR (default /opt/ml), the same variable the
sagemaker-training toolkit reads, so tests and local runs can use a temporary tree.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserInputError

BASE_DIR_VARIABLE = "SAGEMAKER_BASE_DIR"
DEFAULT_BASE_DIR = "/opt/ml"
TRAINING_CHANNEL = "training"
VALIDATION_CHANNEL = "validation"
PRETRAINED_CHANNEL = "pretrained"


@dataclass(frozen=True)
class Paths:
    base: Path

    @property
    def input_config(self) -> Path:
        return self.base / "input" / "config"

    @property
    def hyperparameters_file(self) -> Path:
        return self.input_config / "hyperparameters.json"

    @property
    def resource_config_file(self) -> Path:
        return self.input_config / "resourceconfig.json"

    @property
    def input_data_config_file(self) -> Path:
        return self.input_config / "inputdataconfig.json"

    @property
    def checkpoint_config_file(self) -> Path:
        return self.input_config / "checkpointconfig.json"

    @property
    def input_data(self) -> Path:
        return self.base / "input" / "data"

    @property
    def model_dir(self) -> Path:
        return self.base / "model"

    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    @property
    def output_data_dir(self) -> Path:
        return self.output_dir / "data"

    @property
    def tensorboard_dir(self) -> Path:
        # Where SageMaker's TensorBoardOutputConfig (LocalPath) uploads from while the job runs.
        return self.output_dir / "tensorboard"

    @property
    def failure_file(self) -> Path:
        return self.output_dir / "failure"

    @property
    def default_checkpoint_dir(self) -> Path:
        return self.base / "checkpoints"

    def channel(self, name: str) -> Path:
        return self.input_data / name


def paths_from_env() -> Paths:
    return Paths(Path(os.environ.get(BASE_DIR_VARIABLE, DEFAULT_BASE_DIR)))


def read_json_config(path: Path) -> Any:
    """Read one of SageMaker's config files; a file that is not JSON is the user's to fix."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserInputError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
            "fix the file or let SageMaker write it."
        ) from exc


@dataclass(frozen=True)
class TrainingEnvironment:
    """What the platform tells the container, read once at start."""

    paths: Paths
    hyperparameters: dict[str, Any]
    channels: dict[str, Path]
    input_data_config: dict[str, Any] = field(default_factory=dict)
    current_host: str = "algo-1"
    hosts: tuple[str, ...] = ("algo-1",)
    network_interface_name: str | None = None
    checkpoint_dir: Path | None = None

    def channel(self, name: str) -> Path | None:
        return self.channels.get(name)


def read_environment(paths: Paths | None = None) -> TrainingEnvironment:
    """Read hyperparameters, channels and host layout from the /opt/ml tree."""
    paths = paths or paths_from_env()

    hyperparameters: dict[str, Any] = {}
    if paths.hyperparameters_file.exists():
        hyperparameters = read_json_config(paths.hyperparameters_file)
        if not isinstance(hyperparameters, dict):
            raise UserInputError(
                f"{paths.hyperparameters_file} must hold a JSON object of name: value pairs, "
                f"not a {type(hyperparameters).__name__}."
            )

    input_data_config: dict[str, Any] = {}
    if paths.input_data_config_file.exists():
        input_data_config = read_json_config(paths.input_data_config_file) or {}
    for name, config in input_data_config.items():
        if isinstance(config, dict) and config.get("TrainingInputMode") == "Pipe":
            raise UserInputError(
                f"channel '{name}' uses Pipe input mode, which cannot deliver image folders; "
                "set its TrainingInputMode (or the job's input mode) to File or FastFile."
            )

    channels: dict[str, Path] = {}
    if paths.input_data.is_dir():
        channels = {p.name: p for p in sorted(paths.input_data.iterdir()) if p.is_dir()}

    current_host, hosts, interface = "algo-1", ("algo-1",), None
    if paths.resource_config_file.exists():
        resource = read_json_config(paths.resource_config_file)
        current_host = resource.get("current_host", current_host)
        hosts = tuple(resource.get("hosts") or [current_host])
        interface = resource.get("network_interface_name")

    checkpoint_dir = None
    if paths.checkpoint_config_file.exists():
        local_path = (read_json_config(paths.checkpoint_config_file) or {}).get("LocalPath")
        checkpoint_dir = Path(local_path) if local_path else paths.default_checkpoint_dir

    return TrainingEnvironment(
        paths=paths,
        hyperparameters=hyperparameters,
        channels=channels,
        input_data_config=input_data_config,
        current_host=current_host,
        hosts=hosts,
        network_interface_name=interface,
        checkpoint_dir=checkpoint_dir,
    )
