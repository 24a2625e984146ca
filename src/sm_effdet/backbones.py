"""The EfficientDet backbones a job may ask for, by short name or the seed's dotted name.

The table maps a fixed set of names to effdet model names: hyperparameter strings never
reach import machinery or getattr on a module.
"""

from __future__ import annotations

import difflib

from .errors import UserInputError, shorten

# Short name -> effdet model name. Icevision 0.12 offers all of these but tf_lite3x and
# tf_lite4, which effdet 0.4 added; they are built through the same Icevision config class.
BACKBONES: dict[str, str] = {
    **{f"tf_lite{i}": f"tf_efficientdet_lite{i}" for i in range(5)},
    "tf_lite3x": "tf_efficientdet_lite3x",
    **{f"tf_d{i}": f"tf_efficientdet_d{i}" for i in range(8)},
    "tf_d7x": "tf_efficientdet_d7x",
    # effdet 0.4.1 configures the PyTorch-native D-series only up to d5 (no efficientdet_d6,
    # d7 or d7x): a job asking for them could not build its model.
    **{f"d{i}": f"efficientdet_d{i}" for i in range(6)},
    **{f"tf_d{i}_ap": f"tf_efficientdet_d{i}_ap" for i in range(6)},
}

DOTTED_PREFIXES = (
    "models.ross.efficientdet.backbones.",
    "icevision.models.ross.efficientdet.backbones.",
    "ross.efficientdet.backbones.",
    "efficientdet.backbones.",
    "backbones.",
)

MODEL_TYPES = (
    "models.ross.efficientdet",
    "icevision.models.ross.efficientdet",
    "ross.efficientdet",
    "efficientdet",
)


def short_backbone_name(value: str) -> str:
    """Return the short backbone name for a short or dotted name, or fail naming the choices."""
    name = value.strip()
    for prefix in DOTTED_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    if name in BACKBONES:
        return name
    close = difflib.get_close_matches(name, BACKBONES, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise UserInputError(
        f"hyperparameter 'backbone' has unknown value '{shorten(value)}'; {hint}"
        f"use one of {', '.join(BACKBONES)} (or the dotted form "
        "models.ross.efficientdet.backbones.<name>)."
    )


def check_model_type(value: str) -> str:
    if value.strip() not in MODEL_TYPES:
        raise UserInputError(
            f"hyperparameter 'model_type' has unsupported value '{shorten(value)}'; this container trains "
            "EfficientDet only: use 'models.ross.efficientdet' or leave model_type out."
        )
    return "models.ross.efficientdet"
