"""The best epoch's numbers, from the validation detections that `callbacks.BestEvaluation`
kept: COCO's 12 numbers, per-class AP and the recommended score threshold (best F1 at IoU 0.5),
for model.json, the log and the report; and those detections in COCO's results format.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..data.formats import Category, ImageRecord
from . import coco_eval

if TYPE_CHECKING:
    # For the annotation only: importing callbacks at run time would load Lightning and torch.
    from .callbacks import BestEvaluation

log = logging.getLogger(__name__)


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
    return BestOutcome(
        keeper.epoch, results, evaluation, analysis, threshold, f1, confusion, per_class
    )


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


def detections_json(
    results: np.ndarray, records: list[ImageRecord], categories: list[Category]
) -> list[dict]:
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
