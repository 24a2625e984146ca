"""Data: a channel's annotations in any format as image records (formats/), images decoded and
augmented into batches (dataset.py, transforms.py).

May import: model (its preprocessing and file writing) and the package's root modules. This
file imports nothing, so the launcher reads formats/ without torch.
"""
