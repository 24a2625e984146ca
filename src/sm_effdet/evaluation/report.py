"""The report in output/data/report/: `write_report` draws the plots (plots.py), writes them
with the best epoch's detections, the confusion matrix and index.html (one self-contained page,
`render_html`), and adds the prediction mosaic to TensorBoard; a drawing error is logged, never
raised.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import time
from pathlib import Path
from typing import Any

from ..data.formats import Category, DataReport, ImageRecord
from .best_epoch import BestOutcome, detections_json
from .plots import (
    array_png,
    draw_mosaic,
    plot_box_sizes,
    plot_confusion,
    plot_pr_curves,
    plot_training_curves,
)

log = logging.getLogger(__name__)

REPORT_DIR = "report"
DETECTIONS_FILE = "detections.json"


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
                   [[r["name"], r["id"], _fmt(r["AP"]), _fmt(r["AP50"]), r["boxes"]]
                    for r in outcome.per_class]),
            "<h2>COCO summary (best epoch)</h2>",
            _table(list(outcome.evaluation.stats),
                   [[_fmt(v) for v in outcome.evaluation.stats.values()]]),
        ]
    for title, name in (("Training curves", "training_curves"), ("Precision-recall", "pr_curves"),
                        ("Confusion matrix", "confusion_matrix"), ("Box sizes", "box_sizes"),
                        ("Validation predictions (green: ground truth, red: detections)",
                         "predictions")):
        if name in plots:
            encoded = base64.b64encode(plots[name]).decode("ascii")
            parts.append(f"<h2>{html.escape(title)}</h2><img id='{name}' alt='{name}' "
                         f"src='data:image/png;base64,{encoded}'>")
    counts = data.get("counts", {})
    parts += [
        "<h2>Data</h2>", _table(["count", "value"], [[k, v] for k, v in counts.items()]),
        "<h3>Split</h3>",
        _table(["", ""], [[k, _fmt(v)] for k, v in data.get("split", {}).items()]),
    ]
    examples = data.get("examples", {})
    if examples:
        parts += ["<h3>Examples of what was fixed or skipped</h3>",
                  _table(["reason", "examples"], [[k, "; ".join(v)] for k, v in examples.items()])]
    if history:
        # Every key in first-seen order: epoch 0 of a warm start has validation numbers only.
        keys = list(dict.fromkeys(k for h in history for k in h if k != "epoch"))
        parts += ["<h2>Epochs</h2>",
                  _table(["epoch"] + keys,
                         [[h.get("epoch")] + [_fmt(h.get(k)) for k in keys] for h in history])]
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
            plots["predictions"] = array_png(mosaic)
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
                "labels": names + ["background"],
                "rows": "true class", "columns": "predicted class",
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
            threshold = round(outcome.threshold, 4)
            summary["recommended score threshold (best F1 at IoU 0.5)"] = threshold
            summary["F1 at that threshold"] = round(outcome.f1, 4)
        page = render_html(summary, data_report.to_dict(), hyperparameters, outcome, history, plots)
        (folder / "index.html").write_text(page, encoding="utf-8")
        written.append(folder / "index.html")
    except Exception:
        log.exception("report: could not write %s", folder)
    if mosaic is not None and logger is not None:
        try:
            logger.experiment.add_image(
                "validation/predictions", mosaic, best_epoch or 0, dataformats="HWC"
            )
            logger.experiment.flush()
        except Exception:
            log.exception("report: could not add the prediction mosaic to TensorBoard")
    log.info("report written to %s in %.1f s", folder, time.monotonic() - started)
    return written
