"""The report's drawings, each as PNG bytes: training curves, precision-recall curves, the
confusion matrix, box sizes, and the mosaic of validation images with their boxes and the
detections at the recommended threshold. matplotlib and PIL load on first use.
"""

from __future__ import annotations

import io
import logging
import math
from typing import Any

import numpy as np

from ..data.formats import ImageRecord
from . import coco_eval
from .best_epoch import BestOutcome

log = logging.getLogger(__name__)

MOSAIC_IMAGES = 16
MOSAIC_TILE = 320
# COCO's size ranges, in pixels of area.
SIZE_LIMITS = (32**2, 96**2)
SIZE_NAMES = ("small", "medium", "large")
GT_COLOUR = (40, 200, 40)
PRED_COLOUR = (230, 40, 40)


def _figure_png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    # No "Software" text chunk: it carries matplotlib's web address.
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buffer.getvalue()


def plot_training_curves(history: list[dict[str, Any]]) -> bytes:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    epochs = [h["epoch"] for h in history]

    def series(ax: Any, key: str, label: str) -> None:
        points = [(h["epoch"], h[key]) for h in history if h.get(key) is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label=label)

    series(axes[0], "train_loss", "train loss")
    series(axes[0], "valid_loss", "valid loss")
    axes[0].set_title("loss")
    series(axes[1], "valid_map", "mAP@[.5:.95]")
    series(axes[1], "valid_map_50", "mAP@.5")
    axes[1].set_title("validation mAP")
    series(axes[2], "lr", "learning rate")
    axes[2].set_title("learning rate (end of epoch)")
    for ax in axes:
        ax.set_xlabel("epoch")
        if epochs:
            ax.set_xticks(epochs if len(epochs) <= 20 else epochs[:: max(len(epochs) // 10, 1)])
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    return _figure_png(fig)


def plot_pr_curves(outcome: BestOutcome, names: list[str]) -> bytes:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 6))
    many = len(names) > 20
    for label, name in enumerate(names, start=1):
        scores, precision, recall = coco_eval.precision_recall(outcome.analysis, label)
        if not len(scores):
            continue
        ap50 = outcome.per_class[label - 1]["AP50"] or 0
        line, = ax.plot(recall, precision, linewidth=0.8 if many else 1.5,
                        label=None if many else f"{name} AP50={ap50:.2f}")
        at = np.nonzero(scores >= outcome.threshold)[0]
        if len(at):
            ax.plot(recall[at[-1]], precision[at[-1]], "o", color=line.get_color())
    scores, precision, recall = coco_eval.precision_recall(outcome.analysis)
    if len(scores):
        ax.plot(recall, precision, color="black", linewidth=2.5, label="all classes")
        at = np.nonzero(scores >= outcome.threshold)[0]
        if len(at):
            ax.plot(recall[at[-1]], precision[at[-1]], "o", color="black", markersize=9,
                    label=f"score >= {outcome.threshold:.3f} (best F1 {outcome.f1:.2f})")
    ax.set(xlim=(0, 1.01), ylim=(0, 1.01), xlabel="recall", ylabel="precision",
           title=f"precision-recall at IoU 0.5 (epoch {outcome.epoch}); "
                 "dots: the recommended threshold")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return _figure_png(fig)


def plot_confusion(outcome: BestOutcome, names: list[str]) -> bytes:
    import matplotlib.pyplot as plt

    matrix = outcome.confusion
    labels = list(names) + ["background"]
    size = min(max(5, 0.45 * len(labels) + 3), 30)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    image = ax.imshow(np.log1p(matrix), cmap="Blues")
    fig.colorbar(image, ax=ax, label="log(1 + count)")
    if len(labels) <= 30:
        for i in range(matrix.shape[0]):
            for j in range(matrix.shape[1]):
                if matrix[i, j]:
                    ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=90 if len(labels) > 8 else 0)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted (background: missed boxes)")
    ax.set_ylabel("true (background: false detections)")
    ax.set_title(f"confusion at IoU 0.5, score >= {outcome.threshold:.3f}")
    return _figure_png(fig)


def size_counts(records: list[ImageRecord]) -> list[int]:
    counts = [0, 0, 0]
    for record in records:
        if len(record.boxes):
            boxes = record.boxes
            area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            sizes = np.searchsorted(SIZE_LIMITS, area, side="right")
            for s in range(3):
                counts[s] += int((sizes == s).sum())
    return counts


def plot_box_sizes(
    train: list[ImageRecord], val: list[ImageRecord], outcome: BestOutcome | None
) -> bytes:
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(3)
    for offset, (name, records) in zip((-0.2, 0.2), (("train", train), ("validation", val))):
        left.bar(x + offset, size_counts(records), width=0.4, label=name)
    left.set_xticks(x, [f"{n}\n{r}" for n, r in zip(SIZE_NAMES, ("< 32²", "32²-96²", "> 96²"))])
    left.set_ylabel("boxes")
    left.set_title("box sizes (COCO areas, in image pixels)")
    left.legend()
    if outcome is not None:
        stats = outcome.evaluation.stats
        values = [stats["APs"], stats["APm"], stats["APl"]]
        right.bar(x, [v or 0 for v in values], color="tab:green")
        for i, v in enumerate(values):
            right.text(i, (v or 0) + 0.01, "no boxes" if v is None else f"{v:.3f}", ha="center")
        right.set_ylim(0, 1)
    right.set_xticks(x, list(SIZE_NAMES))
    right.set_title("validation AP@[.5:.95] per size")
    return _figure_png(fig)


def draw_mosaic(records: list[ImageRecord], outcome: BestOutcome, names: list[str]) -> np.ndarray:
    """Up to 16 validation images, ground truth in green and detections at or above the
    recommended threshold in red, each with its class name; an RGB uint8 array."""
    from PIL import Image, ImageDraw

    # Here, not at the top: data.dataset loads torch, which nothing else in this module needs.
    from ..data.dataset import ImageLoadError, load_image

    chosen = list(range(min(MOSAIC_IMAGES, len(records))))
    columns = min(4, max(len(chosen), 1))
    rows = max(math.ceil(len(chosen) / columns), 1)
    canvas = Image.new("RGB", (columns * MOSAIC_TILE, rows * MOSAIC_TILE), (30, 30, 30))
    results = outcome.results[outcome.results[:, 5] >= outcome.threshold]
    for n, index in enumerate(chosen):
        record = records[index]
        try:
            pixels, _, _ = load_image(record)
        except ImageLoadError as exc:  # an unreadable image leaves its tile empty
            log.warning("report mosaic: %s", exc)
            continue
        scale = MOSAIC_TILE / max(record.width, record.height)
        tile = Image.fromarray(pixels).resize(
            (max(round(record.width * scale), 1), max(round(record.height * scale), 1))
        )
        draw = ImageDraw.Draw(tile)
        for box, label in zip(record.boxes, record.labels):
            _box(draw, box * scale, names[int(label) - 1], GT_COLOUR, above=False)
        for row in results[results[:, 0] == index]:
            x, y, w, h = row[1:5] * scale
            text = f"{names[int(row[6]) - 1]} {row[5]:.2f}"
            _box(draw, (x, y, x + w, y + h), text, PRED_COLOUR, above=True)
        canvas.paste(tile, ((n % columns) * MOSAIC_TILE, (n // columns) * MOSAIC_TILE))
    return np.asarray(canvas)


def _box(draw: Any, box: Any, text: str, colour: tuple[int, int, int], above: bool) -> None:
    x1, y1, x2, y2 = (float(v) for v in box)
    draw.rectangle((x1, y1, x2, y2), outline=colour, width=2)
    left, top, right, bottom = draw.textbbox((0, 0), text)
    y = y1 - (bottom - top) - 3 if above else y2 + 1
    draw.rectangle((x1, y, x1 + right - left + 3, y + bottom - top + 3), fill=colour)
    draw.text((x1 + 1, y), text, fill=(255, 255, 255))


def array_png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()
