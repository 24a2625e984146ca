"""What goes into /opt/ml/model: the best weights, model.json, a standalone inference script
and, when the export worked, model.onnx.

Every file is written to a temporary name in the same folder, flushed to disk and renamed, so
a kill at any moment leaves either no file or a whole one. The model files are staged in a
hidden folder and moved in only once all of them are written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "model.json"
INFERENCE_FILE = "inference.py"
MODEL_FILES = (WEIGHTS_FILE, METADATA_FILE, INFERENCE_FILE)
ONNX_FILE = "model.onnx"
OPTIONAL_FILES = (ONNX_FILE,)
STAGING_PREFIX = ".staging-"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the files from other users
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_model(
    model_dir: Path, state: dict[str, torch.Tensor], metadata: dict[str, Any],
    extra_files: Sequence[Path] = (),
) -> list[Path]:
    """Write the model files through a staging folder; return their final paths.

    extra_files (already written elsewhere, e.g. model.onnx) are moved in with the rest.
    """
    from safetensors.torch import save

    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=model_dir))
    try:
        tensors = {k: v.contiguous() for k, v in state.items()}
        atomic_write_bytes(staging / WEIGHTS_FILE, save(tensors))
        atomic_write_text(staging / METADATA_FILE, json.dumps(metadata, indent=2, default=str) + "\n")
        source = Path(__file__).with_name(INFERENCE_FILE)
        atomic_write_bytes(staging / INFERENCE_FILE, source.read_bytes())
        for path in extra_files:
            shutil.move(path, staging / path.name)
        written = []
        for name in (*MODEL_FILES, *(p.name for p in extra_files)):
            os.replace(staging / name, model_dir / name)
            written.append(model_dir / name)
        for name in OPTIONAL_FILES:  # an earlier job's model.onnx must not outlive its weights
            if model_dir / name not in written:
                (model_dir / name).unlink(missing_ok=True)
        _fsync_dir(model_dir)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_partial_model(model_dir: Path) -> None:
    """After a failure: leave nothing of this job's in the model folder."""
    if not model_dir.is_dir():
        return
    for path in model_dir.iterdir():
        if path.name.startswith(STAGING_PREFIX):
            shutil.rmtree(path, ignore_errors=True)
        elif path.name in MODEL_FILES + OPTIONAL_FILES or (
            path.name.startswith(".") and path.name.endswith(".tmp")
        ):
            path.unlink(missing_ok=True)
