"""model.json, the model card: one writer (the job) and one reader (inference.py and the server).

This file is copied beside inference.py into the model folder; the reader half must stay
standalone (standard library only). The writer imports the package lazily, inside the job.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

METADATA_FILE = "model.json"
DEFAULT_SCORE_THRESHOLD = 0.3
DEFAULT_MAX_DETECTIONS = 100
REQUIRED_KEYS = ("effdet_model_name", "img_size", "num_classes", "weights_file", "classes", "normalization")


class ModelCardError(ValueError):
    pass


# ---------------------------------------------------------------- reader


def file_inside(folder: str | Path, name: str | Path) -> Path:
    """folder/name, refused when it or a link on its way leads outside `folder`.

    The rule the training images follow (nothing outside the channel) for every file the server
    or a warm start opens: a link inside a model folder or channel must not reach other files.
    """
    folder = Path(folder)
    path = folder / name
    try:
        inside = path.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError) as exc:  # a link loop
        raise ModelCardError(f"{path} cannot be resolved ({type(exc).__name__}); replace it with the file itself.") from None
    if not inside:
        raise ModelCardError(
            f"{path} leads outside {folder} (to {path.resolve()}); put the file itself in the "
            "folder instead of a link to elsewhere."
        )
    return path


def read_model_card(model_dir: str | Path) -> dict[str, Any]:
    """model.json of a model folder, checked; fails with one sentence naming what is wrong."""
    path = Path(model_dir) / METADATA_FILE
    try:
        card = json.loads(file_inside(model_dir, METADATA_FILE).read_text())
    except FileNotFoundError:
        raise ModelCardError(
            f"{path} does not exist; point the model folder at the contents of a training job's "
            "model.tar.gz."
        ) from None
    except RecursionError:
        raise ModelCardError(f"{path} is nested too deeply to read; use the model.json a training job wrote.") from None
    except (OSError, ValueError) as exc:
        if isinstance(exc, ModelCardError):
            raise
        raise ModelCardError(f"{path} is not readable JSON ({str(exc)[:200]}); use the model.json a training job wrote.") from None
    missing = [k for k in REQUIRED_KEYS if k not in card] if isinstance(card, dict) else list(REQUIRED_KEYS)
    if missing:
        raise ModelCardError(f"{path} lacks {', '.join(missing)}; use the model.json a training job wrote.")
    problem = _card_problem(card)
    if problem:
        raise ModelCardError(f"{path}: {problem}; use the model.json a training job wrote.")
    file_inside(model_dir, card["weights_file"])
    return card


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _card_problem(card: dict[str, Any]) -> str | None:
    """What makes the fields disagree with their format or with each other, else None."""
    if not isinstance(card["effdet_model_name"], str) or not card["effdet_model_name"]:
        return "'effdet_model_name' is not a model name"
    size = card["img_size"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 128 or size % 128:
        return f"'img_size' is {str(size)[:40]}, not a multiple of 128"
    classes = card["classes"]
    if not isinstance(classes, list) or not classes:
        return "'classes' is not a non-empty list of classes (a model with no classes detects nothing)"
    for i, c in enumerate(classes):
        if not isinstance(c, dict) or not isinstance(c.get("name"), str) or c.get("label") != i + 1:
            return f"'classes'[{i}] is not {{\"label\": {i + 1}, \"name\": ...}}"
    if card["num_classes"] != len(classes):
        return f"'num_classes' is {str(card['num_classes'])[:40]} but 'classes' lists {len(classes)}"
    norm = card["normalization"]
    if not isinstance(norm, dict):
        return "'normalization' is not an object with mean and std"
    for key, low in (("mean", -math.inf), ("std", 0)):
        values = norm.get(key)
        if not isinstance(values, list) or len(values) != 3 or not all(_is_number(v) and v > low for v in values):
            kind = "positive numbers" if key == "std" else "numbers"
            return f"'normalization'.'{key}' is {str(values)[:60]}, not 3 {kind}"
    fill = norm.get("fill", [0, 0, 0])
    if not isinstance(fill, list) or len(fill) != 3 or not all(_is_number(v) and 0 <= v <= 255 for v in fill):
        return f"'normalization'.'fill' is {str(fill)[:60]}, not 3 numbers from 0 to 255"
    name = card["weights_file"]
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        return f"'weights_file' is {str(name)[:80]!r}, not a file name inside the model folder"
    return None


def default_score_threshold(card: dict[str, Any]) -> float:
    """The training job's recommended threshold when it wrote one, else 0.3."""
    value = card.get("recommended_score_threshold")
    return float(value) if isinstance(value, (int, float)) else DEFAULT_SCORE_THRESHOLD


def describe(card: dict[str, Any]) -> str:
    """One line for a log: backbone, size, classes and the job's best metrics."""
    names = ", ".join(c["name"] for c in card["classes"][:20])
    more = f" (+{len(card['classes']) - 20} more)" if len(card["classes"]) > 20 else ""
    metrics = card.get("metrics") or {}
    shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float)))
    return (
        f"model {card.get('backbone', card['effdet_model_name'])} ({card['effdet_model_name']}) at "
        f"{card['img_size']} px, {card['num_classes']} classes: {names}{more}; best epoch "
        f"{card.get('best_epoch')} {shown or '(no metrics)'}; normalization mean "
        f"{card['normalization']['mean']} std {card['normalization']['std']}"
    )


# ---------------------------------------------------------------- writer


def _versions() -> dict[str, str]:
    from importlib import metadata as importlib_metadata

    versions = {}
    for package in ("sm-effdet", "torch", "effdet", "icevision", "lightning", "timm"):
        try:
            versions[package] = importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            pass
    return versions


def model_metadata(
    hp: Any, categories: list[Any], summary: Any, report: Any, seconds: float, world_size: int,
    normalization: dict[str, Any], effdet_model_name: str, weights_file: str,
) -> dict[str, Any]:
    """The contents of model.json for a finished job."""
    return {
        "format_version": 1,
        "framework": "effdet",
        "effdet_model_name": effdet_model_name,
        "backbone": hp.backbone,
        "img_size": hp.img_size,
        "num_classes": len(categories),
        "weights_file": weights_file,
        "weights_of": "effdet.EfficientDet (bench.model); load with effdet.create_model("
        "effdet_model_name, bench_task='predict', num_classes, image_size=(img_size, img_size))",
        "classes": [
            {"label": i + 1, "id": c.id, "name": c.name} for i, c in enumerate(categories)
        ],
        "normalization": {
            "mean": list(normalization["mean"]),
            "std": list(normalization["std"]),
            "fill": list(normalization["fill"]),
            "input": "RGB scaled to [0, 1], then (x - mean) / std; padding is `fill` (0..255) "
            "before normalisation",
        },
        "preprocessing": "decode (JPEGs of at least twice img_size at libjpeg's reduced scale), "
        "EXIF upright, resize the longest side to img_size keeping the aspect ratio (OpenCV "
        "bilinear), then pad bottom and right with normalization.fill to img_size x img_size: "
        "preprocessing.py beside this file",
        "output": "per image up to 100 rows [x1, y1, x2, y2, score, label] in the input image's "
        "pixels when img_scale = max(width, height) / img_size is passed; label is "
        "classes[].label",
        "monitor": summary.monitor,
        "best_epoch": summary.best_epoch,
        "metrics": summary.best_metrics,
        "history": summary.history,
        "hyperparameters": hp.to_dict(),
        "data": report.split,
        "world_size": world_size,
        "training_seconds": round(seconds, 1),
        "versions": _versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
