"""The SageMaker training environment: /opt/ml paths, channels and the config files.

Every path derives from SAGEMAKER_BASE_DIR (default /opt/ml), the same variable the
sagemaker-training toolkit reads, so tests and local runs can use a temporary tree.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserInputError, shorten

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
        return json.loads(path.read_bytes().decode("utf-8"))
    except json.JSONDecodeError as exc:
        raise UserInputError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
            "fix the file or let SageMaker write it."
        ) from exc
    except UnicodeDecodeError:
        raise UserInputError(
            f"{path} is not UTF-8 text; save it as UTF-8 JSON or let SageMaker write it."
        ) from None
    except RecursionError:
        raise UserInputError(
            f"{path} is nested too deeply to be read; give it the flat layout SageMaker writes."
        ) from None
    except OSError as exc:
        raise UserInputError(
            f"{path} cannot be read ({exc.strerror or exc}); make it a readable file."
        ) from None


def _require(path: Path, key: str | None, value: Any, kind: type | tuple, expected: str) -> Any:
    """`value` when it is of `kind`; otherwise a failure naming the file, the key and the type."""
    if isinstance(value, kind) and not isinstance(value, bool):
        return value
    where = f"'{key}' in {path}" if key else str(path)
    raise UserInputError(
        f"{where} must be {expected}, not {shorten(json.dumps(value, default=str))}; fix the "
        "file or let SageMaker write it."
    )


def read_input_data_config(path: Path) -> dict[str, Any]:
    # No `or {}`: an empty list (or null) is a file of the wrong shape, not "no channels".
    config = _require(path, None, read_json_config(path), dict,
                      'a JSON object of channel name: settings ({"training": {...}})')
    for name, settings in config.items():
        settings = _require(path, name, settings, dict, 'a JSON object ({"TrainingInputMode": "File"})')
        if settings.get("TrainingInputMode") == "Pipe" and not streams_augmented_manifest(settings):
            raise UserInputError(
                f"channel '{shorten(name)}' uses Pipe input mode, which cannot deliver image "
                "folders; set its TrainingInputMode (or the job's input mode) to File or FastFile, "
                "or stream a Ground Truth augmented manifest (S3DataType AugmentedManifestFile, "
                "AttributeNames [\"source-ref\", \"<label attribute>\"], RecordWrapperType RecordIO)."
            )
    return config


def streams_augmented_manifest(settings: dict[str, Any]) -> bool:
    """Whether a Pipe channel delivers image and label records the job can cache: RecordIO
    wrapping keeps each image apart from its label (inputdataconfig.json carries
    RecordWrapperType; S3DataType is checked when present)."""
    return settings.get("RecordWrapperType") == "RecordIO" and settings.get(
        "S3DataType", "AugmentedManifestFile") == "AugmentedManifestFile"


def read_resource_config(path: Path) -> tuple[str, tuple[str, ...], str | None]:
    """current_host, hosts and network_interface_name, each checked for its type."""
    config = _require(path, None, read_json_config(path), dict,
                      'a JSON object ({"current_host": "algo-1", "hosts": ["algo-1"]})')
    current_host = _require(path, "current_host", config.get("current_host", "algo-1"), str,
                            'a host name ("algo-1")')
    hosts = _require(path, "hosts", config.get("hosts") or [current_host], list,
                     'a list of host names (["algo-1", "algo-2"])')
    for host in hosts:
        _require(path, "hosts", host, str, 'a list of host names (["algo-1", "algo-2"])')
    interface = config.get("network_interface_name")
    if interface is not None:
        _require(path, "network_interface_name", interface, str, 'an interface name ("eth0")')
    return current_host, tuple(hosts), interface


def read_checkpoint_dir(path: Path, default: Path) -> Path:
    config = _require(path, None, read_json_config(path) or {}, dict,
                      'a JSON object ({"LocalPath": "/opt/ml/checkpoints"})')
    local_path = config.get("LocalPath")
    if local_path is None or local_path == "":
        return default
    return Path(_require(path, "LocalPath", local_path, str, 'a directory path ("/opt/ml/checkpoints")'))


def check_writable(paths: Paths, checkpoint_dir: Path | None) -> None:
    """Fail now, before any training, when model/, output/ or the checkpoint location cannot
    be written: otherwise a read-only model/ is found only after all the training."""
    targets = (
        (paths.model_dir, "the model directory", "make it a writable directory"),
        (paths.output_dir, "the output directory", "make it a writable directory"),
        (checkpoint_dir or paths.default_checkpoint_dir, "the checkpoint location",
         "set CheckpointConfig's LocalPath to a directory the job can write"),
    )
    for path, what, advice in targets:
        problem = _not_writable(path)
        if problem:
            raise UserInputError(f"{what} {shorten(str(path), 200)} {problem}; {advice}.")


def _not_writable(path: Path) -> str | None:
    """Why `path` cannot take new files, or None. A probe file is created and removed: unlike
    os.access it sees read-only mounts and immutable directories, also as root."""
    if path.exists() and not path.is_dir():
        return "is a file, not a directory"
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"cannot be written ({exc.strerror or exc})"
    return None


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
        input_data_config = read_input_data_config(paths.input_data_config_file)

    channels: dict[str, Path] = {}
    if paths.input_data.is_dir():
        channels = {p.name: p for p in sorted(paths.input_data.iterdir()) if p.is_dir()}

    current_host, hosts, interface = "algo-1", ("algo-1",), None
    if paths.resource_config_file.exists():
        current_host, hosts, interface = read_resource_config(paths.resource_config_file)

    checkpoint_dir = None
    if paths.checkpoint_config_file.exists():
        checkpoint_dir = read_checkpoint_dir(paths.checkpoint_config_file, paths.default_checkpoint_dir)

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
