"""Evaluation: COCO mAP with IoU-0.5 matching (coco_eval.py) and the report of what a model
learned (report.py): plots, per-class tables, the HTML page, TensorBoard scalars.

May import: data, model and the package's root modules.
"""
