"""Evaluation: COCO mAP with IoU-0.5 matching (coco_eval.py) and the report of what a model
learned: what runs during training (callbacks.py: the best epoch's detections, TensorBoard
scalars), the best epoch's numbers (best_epoch.py: per-class AP, the recommended threshold),
the drawings (plots.py) and the HTML page (report.py).

May import: data, model and the package's root modules.
"""
