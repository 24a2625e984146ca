"""COCO mAP with pycocotools, against the validation records in original image pixels."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np

from .coco import ImageRecord

# Detections below this score are left out of evaluation, as COCO evaluation usually does.
MIN_SCORE = 0.001


def ground_truth(records: list[ImageRecord], num_classes: int) -> dict[str, Any]:
    """A COCO dict whose image ids are record positions and category ids are labels 1..K."""
    images, annotations = [], []
    for index, record in enumerate(records):
        images.append({"id": index, "width": record.width, "height": record.height})
        rows = [(b, int(l), 0) for b, l in zip(record.boxes, record.labels)]
        # Crowd regions are kept as COCO keeps them: matches to them are neither right nor wrong.
        rows += [(b, 1, 1) for b in record.crowd_boxes]
        for box, label, crowd in rows:
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index,
                    "category_id": label,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": crowd,
                }
            )
    categories = [{"id": i} for i in range(1, num_classes + 1)]
    return {"images": images, "annotations": annotations, "categories": categories}


def detections_to_results(detections: np.ndarray, indices: np.ndarray) -> list[list[float]]:
    """effdet detections (B, D, 6: x1 y1 x2 y2 score class) -> rows for COCO loadRes."""
    rows = []
    for det, index in zip(detections, indices):
        det = det[det[:, 4] >= MIN_SCORE]
        for x1, y1, x2, y2, score, label in det:
            rows.append([float(index), x1, y1, x2 - x1, y2 - y1, score, label])
    return rows


def coco_map(gt: dict[str, Any], results: list[list[float]]) -> dict[str, float]:
    """mAP@[.5:.95] and mAP@.5 of the results; 0 when there is nothing to match."""
    if not results or not gt["annotations"]:
        return {"map": 0.0, "map_50": 0.0}
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(np.asarray(results, dtype=np.float64))
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats
    return {"map": max(float(stats[0]), 0.0), "map_50": max(float(stats[1]), 0.0)}
