"""COCO evaluation of the validation detections, against the records in original image pixels.

`evaluate` gives COCO's 12 numbers and per-class AP through faster-coco-eval (pycocotools'
algorithm in C++, the same numbers: see `make bench` and tests/test_report.py) or pycocotools.
`analyse_at_iou` matches detections to boxes at IoU 0.5 for the precision-recall curves, the
best-F1 score threshold and the confusion matrix.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..data.formats import ImageRecord

# Detections below this score are left out of evaluation, as COCO evaluation usually does.
MIN_SCORE = 0.001
# COCO's summary, in COCOeval.stats order.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
EVALUATORS = ("faster-coco-eval", "pycocotools")
# Measured in `make bench`: equal numbers, several times faster (docs/performance.md).
DEFAULT_EVALUATOR = "faster-coco-eval"
# One row per detection: image index (position in the records), x, y, w, h, score, label.
RESULT_COLUMNS = 7


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


def detections_to_results(detections: np.ndarray, indices: Any) -> np.ndarray:
    """effdet detections (B, D, 6: x1 y1 x2 y2 score class) -> (N, 7) result rows, in one go."""
    detections = np.asarray(detections, dtype=np.float32)
    indices = np.asarray(indices, dtype=np.float32)
    keep = detections[..., 4] >= MIN_SCORE
    det = detections[keep]
    image = np.broadcast_to(indices[:, None], detections.shape[:2])[keep]
    return np.column_stack(
        [image, det[:, 0], det[:, 1], det[:, 2] - det[:, 0], det[:, 3] - det[:, 1], det[:, 4], det[:, 5]]
    ).astype(np.float32)


def empty_results() -> np.ndarray:
    return np.zeros((0, RESULT_COLUMNS), np.float32)


@dataclass
class Evaluation:
    """COCO's 12 numbers (None where COCO has nothing to measure, e.g. no small boxes) and AP,
    AP@50 per class label (None for a class without validation boxes)."""

    stats: dict[str, float | None]
    class_ap: dict[int, float | None] = field(default_factory=dict)
    class_ap50: dict[int, float | None] = field(default_factory=dict)

    def epoch_metrics(self) -> dict[str, float]:
        """The values of the epoch line; a size with no boxes is left out rather than 0."""
        metrics = {"valid_map": self.stats["AP"] or 0.0, "valid_map_50": self.stats["AP50"] or 0.0}
        for key, name in (("valid_map_small", "APs"), ("valid_map_medium", "APm"),
                          ("valid_map_large", "APl")):
            if self.stats[name] is not None:
                metrics[key] = self.stats[name]
        return metrics


def _api(evaluator: str):
    if evaluator == "faster-coco-eval":
        import functools

        from faster_coco_eval import COCO, COCOeval_faster

        # It logs each phase and the summary at INFO; the epoch line already says what matters.
        return COCO, functools.partial(COCOeval_faster, print_function=lambda *args: None)
    if evaluator == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    raise ValueError(f"unknown evaluator {evaluator!r}; one of {EVALUATORS}")


def _defined(value: float) -> float | None:
    return float(value) if value >= 0 else None  # COCO writes -1 for "nothing to measure"


def evaluate(gt: dict[str, Any], results: np.ndarray, evaluator: str = DEFAULT_EVALUATOR) -> Evaluation:
    """COCO bbox evaluation of the result rows; zeros when there is nothing to match."""
    labels = [c["id"] for c in gt["categories"]]
    if not len(results) or not gt["annotations"]:
        return Evaluation({name: 0.0 for name in STAT_NAMES}, {l: 0.0 for l in labels},
                          {l: 0.0 for l in labels})
    COCO, COCOeval = _api(evaluator)
    with contextlib.redirect_stdout(io.StringIO()):  # both print progress lines
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(np.asarray(results, dtype=np.float64))
        coco = COCOeval(coco_gt, coco_dt, iouType="bbox")
        coco.evaluate()
        coco.accumulate()
        coco.summarize()
    stats = {name: _defined(v) for name, v in zip(STAT_NAMES, coco.stats[: len(STAT_NAMES)])}
    # precision: [IoU threshold, recall point, class, area range, max detections]; -1 = undefined
    precision = np.asarray(coco.eval["precision"])[:, :, :, 0, -1]
    class_ap, class_ap50 = {}, {}
    for k, label in enumerate(coco.params.catIds):
        every, at_50 = precision[:, :, k], precision[0, :, k]
        class_ap[label] = float(every[every > -1].mean()) if (every > -1).any() else None
        class_ap50[label] = float(at_50[at_50 > -1].mean()) if (at_50 > -1).any() else None
    return Evaluation(stats, class_ap, class_ap50)


# --- matching at one IoU threshold: precision-recall, best F1, confusion matrix ---------------


def _xyxy(xywh: np.ndarray) -> np.ndarray:
    out = np.array(xywh, dtype=np.float64).reshape(-1, 4)
    out[:, 2:] += out[:, :2]
    return out


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of a (N, 4 x1y1x2y2) with every box of b (M, 4)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def _greedy_match(iou: np.ndarray, scores: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """COCO's greedy rule: detections by falling score each take the unmatched box they overlap
    most (IoU >= threshold). Walking the candidate pairs in (score, IoU) order is the same."""
    det, box = np.nonzero(iou >= threshold)
    order = np.lexsort((-iou[det, box], -scores[det]))
    used_det, used_box, pairs = set(), set(), []
    for d, b in zip(det[order].tolist(), box[order].tolist()):
        if d not in used_det and b not in used_box:
            used_det.add(d)
            used_box.add(b)
            pairs.append((d, b))
    return pairs


@dataclass
class IouAnalysis:
    """Every detection's score, label and whether it is a true positive at the IoU threshold
    (same class); boxes per class; and matched (true, predicted) label pairs for the confusion
    matrix, from class-agnostic matching of the detections at or above `threshold`."""

    scores: np.ndarray
    labels: np.ndarray
    true_positive: np.ndarray
    boxes_per_class: np.ndarray  # index = label (0 unused)
    iou_threshold: float


def _by_image(gt: dict[str, Any], results: np.ndarray):
    boxes: dict[int, list] = {}
    for ann in gt["annotations"]:
        boxes.setdefault(ann["image_id"], []).append(ann)
    order = np.argsort(results[:, 0], kind="stable")
    results = results[order]
    starts = np.searchsorted(results[:, 0], [img["id"] for img in gt["images"]], side="left")
    ends = np.searchsorted(results[:, 0], [img["id"] for img in gt["images"]], side="right")
    for img, start, end in zip(gt["images"], starts, ends):
        anns = boxes.get(img["id"], [])
        real = [a for a in anns if not a["iscrowd"]]
        crowd = [a for a in anns if a["iscrowd"]]
        yield (
            _xyxy([a["bbox"] for a in real]),
            np.array([a["category_id"] for a in real], dtype=np.int64),
            _xyxy([a["bbox"] for a in crowd]),
            results[start:end],
        )


def _not_on_crowd(dets: np.ndarray, crowd: np.ndarray, threshold: float) -> np.ndarray:
    # A detection on a crowd region is neither right nor wrong (COCO ignores it).
    if not len(crowd) or not len(dets):
        return np.ones(len(dets), bool)
    return ~(box_iou(_xyxy(dets[:, 1:5]), crowd) >= threshold).any(axis=1)


def analyse_at_iou(gt: dict[str, Any], results: np.ndarray, iou_threshold: float = 0.5) -> IouAnalysis:
    num_classes = len(gt["categories"])
    boxes_per_class = np.zeros(num_classes + 1, np.int64)
    scores, labels, tps = [], [], []
    for boxes, box_labels, crowd, dets in _by_image(gt, np.asarray(results, np.float64)):
        np.add.at(boxes_per_class, box_labels, 1)
        dets = dets[_not_on_crowd(dets, crowd, iou_threshold)]
        if not len(dets):
            continue
        tp = np.zeros(len(dets), bool)
        if len(boxes):
            iou = box_iou(_xyxy(dets[:, 1:5]), boxes)
            iou[dets[:, 6].astype(np.int64)[:, None] != box_labels[None, :]] = 0
            for d, _ in _greedy_match(iou, dets[:, 5], iou_threshold):
                tp[d] = True
        scores.append(dets[:, 5])
        labels.append(dets[:, 6].astype(np.int64))
        tps.append(tp)
    cat = (lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype))
    return IouAnalysis(cat(scores, np.float64), cat(labels, np.int64), cat(tps, bool),
                       boxes_per_class, iou_threshold)


def precision_recall(analysis: IouAnalysis, label: int | None = None):
    """(scores, precision, recall) with the detections in falling score order; all classes
    pooled when label is None."""
    mask = np.ones(len(analysis.labels), bool) if label is None else analysis.labels == label
    total = analysis.boxes_per_class[1:].sum() if label is None else analysis.boxes_per_class[label]
    order = np.argsort(-analysis.scores[mask], kind="stable")
    scores = analysis.scores[mask][order]
    tp = np.cumsum(analysis.true_positive[mask][order])
    precision = tp / np.arange(1, len(tp) + 1)
    recall = tp / max(int(total), 1)
    return scores, precision, recall


def best_f1_threshold(analysis: IouAnalysis) -> tuple[float, float]:
    """(score threshold, F1) where F1 over all classes pooled is highest; (0.5, 0) when nothing
    is ever right. Keeping detections at or above the threshold gives that F1."""
    scores, precision, recall = precision_recall(analysis)
    if not len(scores):
        return 0.5, 0.0
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    # Only the last detection of a run of equal scores is a threshold one can actually cut at.
    last_of_score = np.append(scores[1:] != scores[:-1], True)
    f1 = np.where(last_of_score, f1, -1)
    best = int(np.argmax(f1))
    if f1[best] <= 0:
        return 0.5, 0.0
    return float(scores[best]), float(f1[best])


def confusion_matrix(
    gt: dict[str, Any], results: np.ndarray, score_threshold: float, iou_threshold: float = 0.5
) -> np.ndarray:
    """(K+1, K+1) counts: rows are the true class, columns the predicted class, by label - 1;
    the last row and column are background: row K counts false detections, column K missed
    boxes. Detections at or above the threshold are matched to boxes of any class (greedy by
    score, IoU >= iou_threshold), so a box found as the wrong class shows as a confusion."""
    k = len(gt["categories"])
    matrix = np.zeros((k + 1, k + 1), np.int64)
    results = np.asarray(results, np.float64)
    results = results[results[:, 5] >= score_threshold] if len(results) else results
    for boxes, box_labels, crowd, dets in _by_image(gt, results):
        dets = dets[_not_on_crowd(dets, crowd, iou_threshold)]
        det_labels = dets[:, 6].astype(np.int64)
        pairs = []
        if len(dets) and len(boxes):
            pairs = _greedy_match(box_iou(_xyxy(dets[:, 1:5]), boxes), dets[:, 5], iou_threshold)
        matched_det = {d for d, _ in pairs}
        matched_box = {b for _, b in pairs}
        for d, b in pairs:
            matrix[box_labels[b] - 1, det_labels[d] - 1] += 1
        for b in set(range(len(boxes))) - matched_box:
            matrix[box_labels[b] - 1, k] += 1
        for d in set(range(len(dets))) - matched_det:
            matrix[k, det_labels[d] - 1] += 1
    return matrix


def coco_map(gt: dict[str, Any], results: Any) -> dict[str, float]:
    """mAP@[.5:.95] and mAP@.5 of the results (kept for callers of the first version)."""
    evaluation = evaluate(gt, np.asarray(results, np.float32).reshape(-1, RESULT_COLUMNS))
    return {"map": evaluation.stats["AP"] or 0.0, "map_50": evaluation.stats["AP50"] or 0.0}
