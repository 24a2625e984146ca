"""What the model learned: the best epoch's evaluation, the report in output/data/report/ and
TensorBoard.

During training two callbacks run: `BestEvaluation` keeps the validation detections of the best
epoch (so the report needs no extra inference pass) and `TrainingScalars` writes scalars to
TensorBoard. At the end `summarise_best` turns the kept detections into COCO's 12 numbers, the
per-class table and the recommended score threshold (for model.json and the log), and
`write_report` draws the plots and index.html; a drawing error is logged, never raised.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from ..data.formats import Category, DataReport, ImageRecord
from . import coco_eval

log = logging.getLogger(__name__)

REPORT_DIR = "report"
DETECTIONS_FILE = "detections.json"
MOSAIC_IMAGES = 16
MOSAIC_TILE = 320
# COCO's size ranges, in pixels of area.
SIZE_LIMITS = (32**2, 96**2)
SIZE_NAMES = ("small", "medium", "large")
GT_COLOUR = (40, 200, 40)
PRED_COLOUR = (230, 40, 40)


# --- during training --------------------------------------------------------------------------


class BestEvaluation(L.Callback):
    """Keeps the validation result rows of the best epoch, as chosen by `best` (any object with
    `best_epoch`, such as metrics_log.EpochSummary). Runs after that callback at epoch end and
    before the checkpoint callback, so that a resumed job keeps them too."""

    def __init__(self, best: Any) -> None:
        self.best = best
        self.epoch: int | None = None
        self.results: np.ndarray | None = None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._keep_if_best(trainer.current_epoch + 1, pl_module)

    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._keep_if_best(0, pl_module)  # epoch 0: a warm start's starting weights

    def _keep_if_best(self, epoch: int, pl_module: L.LightningModule) -> None:
        if getattr(pl_module, "val_evaluation", None) is not None and self.best.best_epoch == epoch:
            self.epoch, self.results = epoch, pl_module.val_results

    # Tensors, so that checkpoints still load with weights_only=True.
    def state_dict(self) -> dict[str, Any]:
        results = None if self.results is None else torch.from_numpy(np.ascontiguousarray(self.results))
        return {"epoch": self.epoch, "results": results}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = state.get("epoch")
        results = state.get("results")
        self.results = None if results is None else results.numpy()


class TrainingScalars(L.Callback):
    """TensorBoard scalars through the Trainer's logger (written on global rank 0 only):
    `step/*` every `log_every_n_steps` steps and `epoch/*` after every epoch's validation.

    Reading the loss forces one device sync per logged step, once every n steps: negligible.
    """

    def __init__(self) -> None:
        self._epoch_start = time.monotonic()
        self._epoch_images = 0
        self._window_start = time.monotonic()
        self._window_images = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = self._window_start = time.monotonic()
        self._epoch_images = self._window_images = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        images = 0 if batch.get("images") is None else len(batch["images"])
        self._epoch_images += images
        self._window_images += images
        step = trainer.global_step
        if not trainer.is_global_zero or trainer.logger is None:
            return
        if step != 1 and step % max(trainer.log_every_n_steps, 1):
            return
        now = time.monotonic()
        values = {"step/lr": trainer.optimizers[0].param_groups[0]["lr"]}
        if now > self._window_start:
            values["step/images_per_second"] = self._window_images / (now - self._window_start)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            values["step/train_loss"] = float(loss.detach())
        trainer.logger.log_metrics(values, step=step)
        self._window_start, self._window_images = now, 0

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.logger is None:
            return
        seconds = time.monotonic() - self._epoch_start
        values = _epoch_scalars(trainer.callback_metrics, ("train_", "valid_"))
        values["epoch/lr"] = trainer.optimizers[0].param_groups[0]["lr"]
        values["epoch/epoch_time"] = seconds
        # Images of this rank, times the ranks: the job's throughput.
        values["epoch/images_per_second"] = self._epoch_images * trainer.world_size / max(seconds, 1e-9)
        trainer.logger.log_metrics(values, step=trainer.current_epoch + 1)

    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Epoch 0, a warm start's starting weights: the validation curves begin where it began.
        if not trainer.is_global_zero or trainer.logger is None:
            return
        trainer.logger.log_metrics(_epoch_scalars(trainer.callback_metrics, ("valid_",)), step=0)


def _epoch_scalars(metrics: dict[str, Any], prefixes: tuple[str, ...]) -> dict[str, float]:
    """`epoch/<name>` for each finite metric whose name starts with one of `prefixes`."""
    return {
        f"epoch/{key}": float(value) for key, value in metrics.items()
        if key.startswith(prefixes) and math.isfinite(float(value))
    }


def tensorboard_logger(folder: Path) -> Any:
    from lightning.pytorch.loggers import TensorBoardLogger

    # name="" and version="": events go straight into the folder SageMaker uploads.
    return TensorBoardLogger(save_dir=str(folder), name="", version="", default_hp_metric=False)


# --- at the end: the numbers ------------------------------------------------------------------


@dataclass
class BestOutcome:
    epoch: int
    results: np.ndarray
    evaluation: coco_eval.Evaluation
    analysis: coco_eval.IouAnalysis
    threshold: float
    f1: float
    confusion: np.ndarray
    per_class: list[dict[str, Any]]


def summarise_best(
    keeper: BestEvaluation, val_gt: dict[str, Any] | None, categories: list[Category]
) -> BestOutcome | None:
    """The best epoch's numbers from its kept detections; None without validation."""
    if val_gt is None or keeper.results is None or keeper.epoch is None:
        if val_gt is not None:
            log.warning("the best epoch's validation detections were not kept (checkpoint of an "
                        "older version?); model.json and the report go without per-class numbers")
        return None
    results = keeper.results
    evaluation = coco_eval.evaluate(val_gt, results)
    analysis = coco_eval.analyse_at_iou(val_gt, results, 0.5)
    threshold, f1 = coco_eval.best_f1_threshold(analysis)
    confusion = coco_eval.confusion_matrix(val_gt, results, threshold, 0.5)
    per_class = [
        {
            "name": c.name,
            "id": c.id,
            "AP": evaluation.class_ap.get(label),
            "AP50": evaluation.class_ap50.get(label),
            "boxes": int(analysis.boxes_per_class[label]),
        }
        for label, c in enumerate(categories, start=1)
    ]
    return BestOutcome(keeper.epoch, results, evaluation, analysis, threshold, f1, confusion, per_class)


def add_to_model_card(metadata: dict[str, Any], outcome: BestOutcome | None) -> None:
    if outcome is None:
        return
    metadata.setdefault("metrics", {})
    metadata["metrics"]["coco"] = outcome.evaluation.stats
    metadata["metrics"]["per_class"] = outcome.per_class
    metadata["recommended_score_threshold"] = round(outcome.threshold, 4)
    metadata["recommended_score_threshold_f1"] = round(outcome.f1, 4)


def per_class_table(outcome: BestOutcome) -> str:
    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    width = max([len("class")] + [len(str(row["name"])) for row in outcome.per_class])
    lines = [f"{'class':<{width}}  {'id':>6}  {'AP':>6}  {'AP50':>6}  {'boxes':>6}"]
    for row in outcome.per_class:
        lines.append(f"{row['name']!s:<{width}}  {row['id']!s:>6}  {cell(row['AP']):>6}  "
                     f"{cell(row['AP50']):>6}  {row['boxes']:>6}")
    stats = outcome.evaluation.stats
    lines.append(f"{'all':<{width}}  {'':>6}  {cell(stats['AP']):>6}  {cell(stats['AP50']):>6}  "
                 f"{int(outcome.analysis.boxes_per_class.sum()):>6}")
    return "\n".join(lines)


def detections_json(results: np.ndarray, records: list[ImageRecord], categories: list[Category]) -> list[dict]:
    """COCO results format with the dataset's own image and category ids."""
    rows = []
    for index, x, y, w, h, score, label in np.asarray(results, np.float64).tolist():
        rows.append({
            "image_id": records[int(index)].image_id,
            "category_id": categories[int(label) - 1].id,
            "bbox": [round(x, 2), round(y, 2), round(w, 2), round(h, 2)],
            # Unrounded: the recommended threshold is one of these scores, and a rounded copy
            # could fall on the other side of it.
            "score": score,
        })
    return rows


# --- at the end: the drawings -----------------------------------------------------------------


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
        line, = ax.plot(recall, precision, linewidth=0.8 if many else 1.5,
                        label=None if many else f"{name} AP50={outcome.per_class[label - 1]['AP50'] or 0:.2f}")
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
           title=f"precision-recall at IoU 0.5 (epoch {outcome.epoch}); dots: the recommended threshold")
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
            area = (record.boxes[:, 2] - record.boxes[:, 0]) * (record.boxes[:, 3] - record.boxes[:, 1])
            sizes = np.searchsorted(SIZE_LIMITS, area, side="right")
            for s in range(3):
                counts[s] += int((sizes == s).sum())
    return counts


def plot_box_sizes(train: list[ImageRecord], val: list[ImageRecord], outcome: BestOutcome | None) -> bytes:
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
            _box(draw, (x, y, x + w, y + h), f"{names[int(row[6]) - 1]} {row[5]:.2f}", PRED_COLOUR, above=True)
        canvas.paste(tile, ((n % columns) * MOSAIC_TILE, (n // columns) * MOSAIC_TILE))
    return np.asarray(canvas)


def _box(draw: Any, box: Any, text: str, colour: tuple[int, int, int], above: bool) -> None:
    x1, y1, x2, y2 = (float(v) for v in box)
    draw.rectangle((x1, y1, x2, y2), outline=colour, width=2)
    left, top, right, bottom = draw.textbbox((0, 0), text)
    y = y1 - (bottom - top) - 3 if above else y2 + 1
    draw.rectangle((x1, y, x1 + right - left + 3, y + bottom - top + 3), fill=colour)
    draw.text((x1 + 1, y), text, fill=(255, 255, 255))


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


# --- the page ---------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


PAGE_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #eee; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
"""


def render_html(
    summary: dict[str, Any], data: dict[str, Any], hyperparameters: dict[str, Any],
    outcome: BestOutcome | None, history: list[dict[str, Any]], plots: dict[str, bytes],
) -> str:
    """One self-contained page: every image inline as a data: URI, no script, no web address."""
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>sm-effdet training report</title>",
        f"<style>{PAGE_STYLE}</style></head><body><h1>sm-effdet training report</h1>",
        "<h2>Summary</h2>", _table(["", ""], [[k, _fmt(v)] for k, v in summary.items()]),
    ]
    if outcome is not None:
        parts += [
            "<h2>Per class (best epoch, validation)</h2>",
            _table(["class", "id", "AP", "AP50", "validation boxes"],
                   [[r["name"], r["id"], _fmt(r["AP"]), _fmt(r["AP50"]), r["boxes"]] for r in outcome.per_class]),
            "<h2>COCO summary (best epoch)</h2>",
            _table(list(outcome.evaluation.stats), [[_fmt(v) for v in outcome.evaluation.stats.values()]]),
        ]
    for title, name in (("Training curves", "training_curves"), ("Precision-recall", "pr_curves"),
                        ("Confusion matrix", "confusion_matrix"), ("Box sizes", "box_sizes"),
                        ("Validation predictions (green: ground truth, red: detections)", "predictions")):
        if name in plots:
            encoded = base64.b64encode(plots[name]).decode("ascii")
            parts.append(f"<h2>{html.escape(title)}</h2><img id='{name}' alt='{name}' "
                         f"src='data:image/png;base64,{encoded}'>")
    counts = data.get("counts", {})
    parts += [
        "<h2>Data</h2>", _table(["count", "value"], [[k, v] for k, v in counts.items()]),
        "<h3>Split</h3>", _table(["", ""], [[k, _fmt(v)] for k, v in data.get("split", {}).items()]),
    ]
    examples = data.get("examples", {})
    if examples:
        parts += ["<h3>Examples of what was fixed or skipped</h3>",
                  _table(["reason", "examples"], [[k, "; ".join(v)] for k, v in examples.items()])]
    if history:
        # Every key in first-seen order: epoch 0 of a warm start has validation numbers only.
        keys = list(dict.fromkeys(k for h in history for k in h if k != "epoch"))
        parts += ["<h2>Epochs</h2>",
                  _table(["epoch"] + keys, [[h.get("epoch")] + [_fmt(h.get(k)) for k in keys] for h in history])]
    parts += ["<h2>Hyperparameters</h2>",
              _table(["key", "value"], [[k, _fmt(v)] for k, v in hyperparameters.items()]),
              "</body></html>"]
    return "\n".join(parts)


def write_report(
    folder: Path, outcome: BestOutcome | None, categories: list[Category],
    train_records: list[ImageRecord], val_records: list[ImageRecord], data_report: DataReport,
    hyperparameters: dict[str, Any], history: list[dict[str, Any]], best_epoch: int | None,
    logger: Any = None,
) -> list[Path]:
    """Write output/data/report/ and the mosaic to TensorBoard; never raises (a job that trained
    must not fail for a drawing): each failed part is logged and left out."""
    started = time.monotonic()
    import matplotlib

    matplotlib.use("Agg")
    folder.mkdir(parents=True, exist_ok=True)
    names = [c.name for c in categories]
    plots: dict[str, bytes] = {}
    mosaic = None
    drawings = {
        "training_curves": lambda: plot_training_curves(history),
        "box_sizes": lambda: plot_box_sizes(train_records, val_records, outcome),
    }
    if outcome is not None:
        drawings["pr_curves"] = lambda: plot_pr_curves(outcome, names)
        drawings["confusion_matrix"] = lambda: plot_confusion(outcome, names)
    for name, draw in drawings.items():
        try:
            # Class names are the user's text: a `$` in one must not start TeX math, which
            # fails to parse (or renders as formulas) and costs the whole plot.
            with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
                plots[name] = draw()
        except Exception:
            log.exception("report: could not draw %s; the report goes on without it", name)
    if outcome is not None:
        try:
            mosaic = draw_mosaic(val_records, outcome, names)
            plots["predictions"] = _png(mosaic)
        except Exception:
            log.exception("report: could not draw the prediction mosaic")
    written = []
    try:
        for name, png in plots.items():
            (folder / f"{name}.png").write_bytes(png)
            written.append(folder / f"{name}.png")
        if outcome is not None:
            path = folder / DETECTIONS_FILE
            path.write_text(json.dumps(detections_json(outcome.results, val_records, categories)))
            path_matrix = folder / "confusion_matrix.json"
            path_matrix.write_text(json.dumps({
                "labels": names + ["background"], "rows": "true class", "columns": "predicted class",
                "iou_threshold": 0.5, "score_threshold": outcome.threshold,
                "matrix": outcome.confusion.tolist(),
            }))
            written += [path, path_matrix]
        summary = {
            "best epoch": best_epoch,
            "epochs run": sum(1 for h in history if h.get("epoch", 0) > 0),
            "train images": len(train_records),
            "validation images": len(val_records),
            "train boxes": int(sum(len(r.labels) for r in train_records)),
            "validation boxes": int(sum(len(r.labels) for r in val_records)),
            "classes": len(categories),
        }
        if outcome is not None:
            summary["recommended score threshold (best F1 at IoU 0.5)"] = round(outcome.threshold, 4)
            summary["F1 at that threshold"] = round(outcome.f1, 4)
        page = render_html(summary, data_report.to_dict(), hyperparameters, outcome, history, plots)
        (folder / "index.html").write_text(page, encoding="utf-8")
        written.append(folder / "index.html")
    except Exception:
        log.exception("report: could not write %s", folder)
    if mosaic is not None and logger is not None:
        try:
            logger.experiment.add_image("validation/predictions", mosaic, best_epoch or 0, dataformats="HWC")
            logger.experiment.flush()
        except Exception:
            log.exception("report: could not add the prediction mosaic to TensorBoard")
    log.info("report written to %s in %.1f s", folder, time.monotonic() - started)
    return written
