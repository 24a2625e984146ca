"""`make bench` section 8: the job's COCO evaluator (faster-coco-eval) against pycocotools on
the same generated detections."""

from __future__ import annotations

import time


def generated_detections(n_images: int, per_image: int, classes: int, seed: int = 0):
    """COCO ground truth (1-15 boxes per image) and result rows: noisy copies of the boxes,
    some with the wrong class, with random scores (so that AP is neither 0 nor 1)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    images, annotations, rows = [], [], []
    for i in range(n_images):
        images.append({"id": i, "width": 640, "height": 480})
        n = int(rng.integers(1, 16))
        xy, wh = rng.uniform(0, 500, (n, 2)), rng.uniform(4, 200, (n, 2))
        labels = rng.integers(1, classes + 1, n)
        for b in range(n):
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": int(labels[b]),
                                "bbox": [*xy[b], *wh[b]], "area": float(wh[b].prod()), "iscrowd": 0})
        source = rng.integers(0, n, per_image)
        box = np.concatenate([xy[source], wh[source]], 1) + rng.normal(0, 8, (per_image, 4))
        box[:, 2:] = np.abs(box[:, 2:]) + 1
        label = np.where(rng.random(per_image) < 0.8, labels[source],
                         rng.integers(1, classes + 1, per_image))
        rows.append(np.column_stack([np.full(per_image, i), box, rng.random(per_image), label]))
    gt = {"images": images, "annotations": annotations,
          "categories": [{"id": c} for c in range(1, classes + 1)]}
    return gt, np.concatenate(rows).astype(np.float32)


def evaluation(n_images: int) -> list[str]:
    from sm_effdet.evaluation import coco_eval

    gt, results = generated_detections(n_images, 100, 80)
    seconds, stats = {}, {}
    for evaluator in ("faster-coco-eval", "pycocotools"):
        started = time.perf_counter()
        stats[evaluator] = coco_eval.evaluate(gt, results, evaluator).stats
        seconds[evaluator] = time.perf_counter() - started
    diff = max(abs((stats["faster-coco-eval"][k] or 0) - (stats["pycocotools"][k] or 0))
               for k in coco_eval.STAT_NAMES)
    started = time.perf_counter()
    analysis = coco_eval.analyse_at_iou(gt, results)
    threshold, _ = coco_eval.best_f1_threshold(analysis)
    coco_eval.confusion_matrix(gt, results, threshold)
    extra = time.perf_counter() - started
    fast, slow = seconds["faster-coco-eval"], seconds["pycocotools"]
    return [
        f"  {n_images} images x 100 detections, 80 classes: faster-coco-eval {fast:.2f} s, "
        f"pycocotools {slow:.2f} s = {slow / fast:.1f}x; largest difference of the 12 numbers {diff:.1e}",
        f"  end of job only: IoU-0.5 matching, best-F1 threshold and confusion matrix {extra:.2f} s "
        f"(AP {stats['faster-coco-eval']['AP']:.3f})",
    ]

