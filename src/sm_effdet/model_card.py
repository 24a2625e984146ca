"""model.json, the model card: one writer (the job) and one reader (inference.py and the server).

This file is copied beside inference.py into the model folder; the reader half must stay
standalone (standard library only). The writer imports the package lazily, inside the job.
"""

from __future__ import annotations

import json
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


def read_model_card(model_dir: str | Path) -> dict[str, Any]:
    """model.json of a model folder, checked; fails with one sentence naming what is wrong."""
    path = Path(model_dir) / METADATA_FILE
    try:
        card = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelCardError(
            f"{path} does not exist; point the model folder at the contents of a training job's "
            "model.tar.gz."
        ) from None
    except (OSError, ValueError) as exc:
        raise ModelCardError(f"{path} is not readable JSON ({exc}); use the model.json a training job wrote.") from None
    missing = [k for k in REQUIRED_KEYS if k not in card] if isinstance(card, dict) else list(REQUIRED_KEYS)
    if missing:
        raise ModelCardError(f"{path} lacks {', '.join(missing)}; use the model.json a training job wrote.")
    return card


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
