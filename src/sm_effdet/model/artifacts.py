"""What goes into /opt/ml/model: the best weights, model.json, a standalone inference script
and, when the export worked, model.onnx.

Every file is written to a temporary name in the same folder, flushed to disk and renamed, so
a kill at any moment leaves either no file or a whole one. The model files are staged in a
hidden folder and moved in only once all of them are written.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import stops

if TYPE_CHECKING:
    import torch

WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "model.json"
INFERENCE_FILE = "inference.py"
# The modules inference.py needs, copied beside it so that model/ works without this package.
INFERENCE_MODULES = ("preprocessing.py", "model_card.py")
MODEL_FILES = (WEIGHTS_FILE, METADATA_FILE, INFERENCE_FILE, *INFERENCE_MODULES)
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
        stops.pause_for_test("model-writing")
        atomic_write_text(staging / METADATA_FILE, strict_json(metadata))
        for name in (INFERENCE_FILE, *INFERENCE_MODULES):
            atomic_write_bytes(staging / name, Path(__file__).with_name(name).read_bytes())
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


def strict_json(value: Any) -> str:
    """JSON that every parser reads: NaN and infinities (a diverged metric) become null."""
    return json.dumps(_finite_or_none(value), indent=2, default=str, allow_nan=False) + "\n"


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def non_finite_tensors(state: dict[str, "torch.Tensor"]) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an infinity."""
    import torch

    return [
        name for name, t in state.items()
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]


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
