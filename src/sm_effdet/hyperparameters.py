"""The hyperparameters of the job: a typed schema and the parsing of hyperparameters.json.

SageMaker delivers every value as a string, encoded two ways depending on the caller: plain
`str(v)` (console, boto3, the SDK's generic Estimator: "False", "0.01") or `json.dumps(v)`
(framework estimators: "\"tf_lite0\"", "true"). A hand-written file may hold native JSON
values. Each value is JSON-decoded when it can be, the raw string kept otherwise, and then
coerced to the declared type; `bool("False")` is never used.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .backbones import check_model_type, short_backbone_name
from .errors import UserInputError, shorten

PLATFORM_KEY_PREFIX = "sagemaker_"
PLATFORM_KEYS = frozenset({"_tuning_objective_metric"})

PRECISION_ALIASES = {
    "auto": "auto",
    "32": "32",
    "32-true": "32",
    "fp32": "32",
    "16": "16-mixed",
    "16-mixed": "16-mixed",
    "fp16": "16-mixed",
    "bf16": "bf16-mixed",
    "bf16-mixed": "bf16-mixed",
}
MONITORS = ("valid_map", "valid_loss")
ANNOTATION_FORMATS = ("auto", "coco", "groundtruth", "voc", "yolo", "createml", "builtin")
# The peak learning rate when `learning_rate` is 'auto': each optimizer's own, by where the weights
# come from (training/warm_start.weights_origin). SGD's is measured from scratch on the shapes data
# (docs/training.md, "Recipe": 0.01 reached mAP 0.13, 0.1 reached 0.44, AdamW at 0.001 0.39).
# AdamW from the ImageNet backbone, whose BiFPN and heads start untrained, is measured on BCCD and
# raccoon (docs/quality.md: 0.01 above 0.003, both well above 0.001, on both data sets); the
# starts whose BiFPN and heads are trained already (effdet's COCO detector, a warm start) keep
# 0.001, as does scratch (measured on the shapes data only).
DEFAULT_LEARNING_RATES = {
    "adamw": {"coco": 0.001, "backbone": 0.01, "scratch": 0.001, "warm": 0.001},
    "sgd": {"coco": 0.1, "backbone": 0.1, "scratch": 0.1, "warm": 0.1},
}
# Gradient-norm clipping when `clip_grad_norm` is 'auto'. From scratch the gradient norm is in
# the hundreds (655 and 918 at the first two steps on the shapes data), so clipping at 10 shrinks
# every SGD step 50-100 fold. AdamW divides the gradient's scale out, so clipping only tames its
# spikes.
DEFAULT_CLIP_GRAD_NORMS = {"adamw": 10.0, "sgd": 0.0}
# The backbone's learning rate relative to the rest when `backbone_lr_ratio` is 'auto', by where
# the weights come from (training/warm_start.weights_origin). 1 for every start until
# `make bench-quality` has measured the ratio on both data sets (docs/training.md, "Recipe").
DEFAULT_BACKBONE_LR_RATIOS = {"coco": 1.0, "backbone": 1.0, "scratch": 1.0, "warm": 1.0}
# Warm-up when `warmup_epochs` is 'auto': this many steps, but at least one epoch and at most a
# third of the run (docs/training.md, "Recipe": one epoch of a small data set is a handful of steps).
AUTO_WARMUP_STEPS = 100
# The augmentation and weight averaging of `recipe`: short runs (the job's recipe since the seed)
# and a candidate for long ones (many epochs on a small data set: Ultralytics' scale range on
# every image and effdet's moving average of the weights with timm's warm-up). short stays the
# default for every run length: at 60 epochs on raccoon long scored below it (docs/quality.md,
# "Long runs").
RECIPES = {
    "short": {"scale": (0.75, 1.25), "scale_p": 0.5, "ema_decay": 0.0},
    "long": {"scale": (0.5, 1.5), "scale_p": 1.0, "ema_decay": 0.9998},
}
# `batch_size` auto: the largest of AUTO_BATCH_SIZES whose epoch is at least AUTO_BATCH_MIN_STEPS
# steps, else the smallest: on small data sets more, smaller steps per epoch trained better
# (docs/quality.md, "Batch size").
AUTO_BATCH_SIZES = (8, 4, 2)
AUTO_BATCH_MIN_STEPS = 100
PRETRAINED_CHOICES = "true (effdet's COCO detector), false (from scratch) or backbone (ImageNet backbone only)"


class _Invalid(Exception):
    """Raised by a coercer with the text of what is allowed."""


def _decode(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _number_from_text(value: Any) -> Any:
    # A quoted number ("\"384\"") is still the number the user meant.
    if isinstance(value, str):
        try:
            return json.loads(value.strip())
        except ValueError:
            return value
    return value


def _as_int(value: Any, raw: Any) -> int:
    value = _number_from_text(value)
    if isinstance(value, bool):
        raise _Invalid("a whole number")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise _Invalid("a whole number")


def _as_float(value: Any, raw: Any) -> float:
    value = _number_from_text(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Invalid("a number")
    if not math.isfinite(value):
        raise _Invalid("a finite number")
    return float(value)


def _as_bool(value: Any, raw: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("true", "yes", "on", "1"):
            return True
        if lowered in ("false", "no", "off", "0"):
            return False
    raise _Invalid("true or false")


def _as_str(value: Any, raw: Any) -> str:
    if isinstance(value, str):
        return value
    # "32" decodes to the number 32; the user meant the text they wrote.
    if isinstance(raw, str):
        return raw
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise _Invalid("a text value")


def _between(low: float | None = None, high: float | None = None, *, high_open: bool = False):
    def check(value: float) -> None:
        if low is not None and value < low:
            raise _Invalid(f"at least {low}")
        if high is not None and (value >= high if high_open else value > high):
            raise _Invalid(f"below {high}" if high_open else f"at most {high}")

    return check


def _positive(value: float) -> None:
    if value <= 0:
        raise _Invalid("greater than 0")


def _img_size(value: int) -> None:
    # effdet needs multiples of 128; below 256 it has fewer anchors than its 5000 detection
    # candidates and validation fails inside torch.topk.
    if value < 256 or value % 128 or value > 2048:
        raise _Invalid("a multiple of 128 from 256 to 2048 (for example 512)")


def _fraction(value: float) -> None:
    if not 0 < value <= 1:
        raise _Invalid("greater than 0 and at most 1")


def _auto_or_number(allowed: str, ok: Callable[[float], bool], convert=None):
    """A parser of 'auto' or a number (`convert`, default _as_float) `ok` accepts; anything else
    is refused with `allowed`."""
    convert = convert or _as_float

    def parse(value: Any, raw: Any) -> float | str:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        try:
            number = convert(value, raw)
        except _Invalid:
            raise _Invalid(allowed) from None
        if not ok(number):
            raise _Invalid(allowed)
        return number

    return parse


_auto_or_positive = _auto_or_number("'auto' or a number greater than 0", lambda n: n > 0)
_auto_or_non_negative = _auto_or_number("'auto' or a number of 0 or more", lambda n: n >= 0)
_auto_or_ratio = _auto_or_number("'auto' or a number greater than 0 and at most 10", lambda n: 0 < n <= 10)


def _as_pretrained(value: Any, raw: Any) -> bool | str:
    if isinstance(value, str) and value.strip().lower() == "backbone":
        return "backbone"
    try:
        return _as_bool(value, raw)
    except _Invalid:
        raise _Invalid(PRETRAINED_CHOICES) from None


def _choice(*choices: str, aliases: Mapping[str, str] | None = None):
    table = dict(aliases or {c: c for c in choices})

    def normalise(value: str) -> str:
        key = value.strip().lower()
        if key not in table:
            raise _Invalid("one of " + ", ".join(choices))
        return table[key]

    return normalise


def _auto_or_count(minimum: int) -> Callable[[Any, Any], int | str]:
    """'auto', or a whole number of at least `minimum`."""
    return _auto_or_number(f"'auto' or a whole number of {minimum} or more", lambda n: n >= minimum, _as_int)


def _spec(
    default: Any,
    coerce: Callable[[Any, Any], Any],
    help: str,
    check: Callable[[Any], Any] | None = None,
    optional: bool = False,
) -> Any:
    return field(
        default=default,
        metadata={"coerce": coerce, "check": check, "help": help, "optional": optional},
    )


@dataclass(frozen=True)
class Hyperparameters:
    backbone: str = _spec(
        "tf_lite0",
        _as_str,
        "EfficientDet variant: tf_lite0..tf_lite4, tf_d0..tf_d7, d0..d7, ... or the dotted "
        "form models.ross.efficientdet.backbones.<name>",
        short_backbone_name,
    )
    model_type: str = _spec(
        "models.ross.efficientdet", _as_str, "accepted for the seed; only EfficientDet",
        check_model_type,
    )
    img_size: int = _spec(512, _as_int, "square input size in pixels, a multiple of 128", _img_size)
    batch_size: int | str = _spec(
        "auto", _auto_or_count(1), "images per GPU (per process) and step; auto: the largest of "
        f"{', '.join(map(str, AUTO_BATCH_SIZES))} whose epoch is at least {AUTO_BATCH_MIN_STEPS} steps, else the "
        "smallest (see the log's first lines)",
    )
    epochs: int = _spec(30, _as_int, "passes over the training set", _between(1))
    learning_rate: float | str = _spec(
        "auto", _auto_or_positive, "peak learning rate; auto: for adamw 0.01 from the ImageNet "
        "backbone (pretrained=backbone), else 0.001; 0.1 for sgd (see the log's first lines)"
    )
    optimizer: str = _spec("adamw", _as_str, "adamw or sgd", _choice("adamw", "sgd"))
    momentum: float = _spec(0.9, _as_float, "SGD momentum", _between(0, 1, high_open=True))
    weight_decay: float = _spec(0.0001, _as_float, "weight decay", _between(0))
    lr_schedule: str = _spec(
        "cosine", _as_str, "cosine, step or constant, after the warmup",
        _choice("cosine", "step", "constant"),
    )
    warmup_epochs: float | str = _spec(
        1.0, _auto_or_non_negative, "epochs of linear learning-rate warmup (fractions allowed); "
        f"auto: {AUTO_WARMUP_STEPS} steps, at least one epoch and at most a third of the run",
    )
    backbone_lr_ratio: float | str = _spec(
        "auto", _auto_or_ratio, "the backbone's learning rate relative to learning_rate (the "
        "FPN and heads'); auto by the starting point (see the log's first lines)",
    )
    seed: int = _spec(
        42, _as_int, "random seed for the split, the weights and augmentation",
        _between(0, 2**32 - 1),  # numpy's seed range, which Lightning seeds
    )
    num_workers: int | str = _spec(
        "auto", _auto_or_count(0), "data loader processes per GPU; auto uses every CPU"
    )
    devices: int | str = _spec(
        "auto", _auto_or_count(1), "GPUs to train on per instance, one process each; auto uses all"
    )
    precision: str = _spec(
        "auto", _as_str, "auto (bf16-mixed where the GPU supports it, else 16-mixed; 32 on "
        "CPU), 32, 16-mixed or bf16-mixed",
        _choice("auto", "32", "16-mixed", "bf16-mixed", aliases=PRECISION_ALIASES),
    )
    pretrained: bool | str = _spec(
        True, _as_pretrained, "true: effdet's COCO-pretrained detector; backbone: ImageNet "
        "weights for the backbone only; false: from scratch (weights from a 'pretrained' "
        "channel, else downloaded)",
    )
    freeze_backbone_epochs: int = _spec(
        0, _as_int, "train only the FPN and heads for this many first epochs, then everything",
        _between(0),
    )
    bn_momentum: float = _spec(
        0.1, _as_float, "momentum of the running batch-norm averages of the BiFPN and head layers "
        "(the backbone keeps timm's 0.1); effdet's 0.01 is made for runs of many thousand steps",
        _fraction,
    )
    bn_stats_images: int = _spec(
        0, _as_int, "training images over which the batch-norm statistics are re-estimated "
        "before each validation and before the model is written; 0: the running averages",
        _between(0),
    )
    recipe: str = _spec(
        "short", _as_str, "augmentation and weight averaging: short (scale 0.75-1.25 on half the "
        "images, no EMA) or long (scale 0.5-1.5 on every image, EMA 0.9998; for runs of hundreds "
        "of epochs, unproven at 60)", _choice("short", "long"),
    )
    ema_decay: float | str = _spec(
        "auto", _auto_or_number("'auto' or a number of 0 or more and below 1", lambda n: 0 <= n < 1),
        "decay of the exponential moving average of the weights used for validation and the "
        "model (with warm-up), e.g. effdet's 0.9998; 0 is off; auto: the recipe's",
    )
    clip_grad_norm: float | str = _spec(
        "auto", _auto_or_non_negative, "clip the gradient norm to this value; 0 is off; auto: "
        "10 for adamw, off for sgd",
    )
    val_fraction: float = _spec(
        0.2, _as_float, "share of images held out for validation when there is no validation "
        "channel and no split file", _between(0, 1, high_open=True),
    )
    monitor: str = _spec(
        "valid_map", _as_str, "metric that picks the best model: valid_map or valid_loss",
        _choice(*MONITORS),
    )
    early_stopping_patience: int = _spec(
        0, _as_int, "stop after this many epochs without improvement of monitor; 0 is off",
        _between(0),
    )
    augment: bool = _spec(True, _as_bool, "train-time augmentation (flips, scale, colour)")
    export_onnx: bool = _spec(
        True, _as_bool, "also write model/model.onnx for ONNX Runtime serving (the export takes "
        "tens of seconds at the end of the job); false writes only the PyTorch model",
    )
    checkpoint_every_minutes: float = _spec(
        15.0, _as_float, "write a resumable checkpoint this often within an epoch (one is "
        "written after every epoch and when the job is stopped); 0 is only then", _between(0),
    )
    tensorboard: bool = _spec(
        True, _as_bool, "write TensorBoard events to output/tensorboard (scalars and the "
        "prediction mosaic)",
    )
    num_classes: int | None = _spec(
        None, _as_int, "optional check: number of categories, or that plus one (background)",
        _between(1), optional=True,
    )
    annotations_file: str | None = _spec(
        None, _as_str, "COCO JSON inside the training channel, when it is not found by itself",
        optional=True,
    )
    split_file: str | None = _spec(
        None, _as_str, 'JSON inside the training channel: {"train": [image ids], "val": [...]}',
        optional=True,
    )
    annotation_format: str = _spec(
        "auto", _as_str, "the channels' annotation format: auto (detected per channel), coco, "
        "groundtruth, voc, yolo, createml or builtin (the built-in algorithm's per-image JSON)",
        _choice(*ANNOTATION_FORMATS),
    )
    keep_difficult: bool = _spec(
        True, _as_bool, "Pascal VOC: train on boxes marked difficult; false drops them (counted)"
    )
    label_attribute: str | None = _spec(
        None, _as_str, "Ground Truth manifests: the label attribute holding the boxes, when a "
        "line has several (an adjustment job's, say)", optional=True,
    )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def peak_learning_rate(self, start: str) -> float:
        """The peak rate of the BiFPN and heads for a start from `start` ('coco', 'backbone',
        'scratch' or 'warm')."""
        if self.learning_rate == "auto":
            return DEFAULT_LEARNING_RATES[self.optimizer][start]
        return float(self.learning_rate)

    def backbone_lr_factor(self, start: str) -> float:
        """The backbone's share of the peak rate for a start from `start` ('coco', 'backbone',
        'scratch' or 'warm')."""
        if self.backbone_lr_ratio == "auto":
            return DEFAULT_BACKBONE_LR_RATIOS[start]
        return float(self.backbone_lr_ratio)

    def warmup_steps(self, steps_per_epoch: float, total_steps: int) -> int:
        if self.warmup_epochs == "auto":
            return round(max(steps_per_epoch, min(AUTO_WARMUP_STEPS, total_steps / 3)))
        return round(float(self.warmup_epochs) * steps_per_epoch)

    def chosen_batch_size(self, train_images: int, processes: int) -> tuple[int, str]:
        """The batch size per process for `train_images` split over `processes`, and why."""
        if self.batch_size != "auto":
            return int(self.batch_size), f"batch_size {self.batch_size}"

        def steps(size: int) -> int:
            return math.ceil(train_images / (size * processes))

        sizes = ", ".join(map(str, AUTO_BATCH_SIZES))
        chosen = next((b for b in AUTO_BATCH_SIZES if steps(b) >= AUTO_BATCH_MIN_STEPS), None)
        why = f"the largest of {sizes} that makes at least {AUTO_BATCH_MIN_STEPS}"
        if chosen is None:
            chosen, why = AUTO_BATCH_SIZES[-1], f"the smallest of {sizes}; none makes {AUTO_BATCH_MIN_STEPS}"
        return chosen, f"batch_size auto: {train_images} training images make {steps(chosen)} steps an epoch at {chosen}, {why}"

    def moving_average_decay(self) -> float:
        """The EMA decay; 0 is no moving average."""
        if self.ema_decay == "auto":
            return RECIPES[self.recipe]["ema_decay"]
        return float(self.ema_decay)

    def describe_recipe(self) -> str:
        """The log's line on the recipe."""
        recipe, decay = RECIPES[self.recipe], self.moving_average_decay()
        augmentation = (f"scale {recipe['scale'][0]:g}-{recipe['scale'][1]:g} on {recipe['scale_p']:.0%} of the "
                        "images" if self.augment else "augmentation off (augment=false)")
        ema = f"EMA {decay:g} with warm-up" if decay else "no EMA"
        return f"recipe: {self.recipe}: {augmentation}, {ema}{' (ema_decay auto)' if self.ema_decay == 'auto' else ''}"

    @property
    def gradient_clip(self) -> float | None:
        """The norm to clip gradients to, None for no clipping."""
        if self.clip_grad_norm == "auto":
            return DEFAULT_CLIP_GRAD_NORMS[self.optimizer] or None
        return float(self.clip_grad_norm) or None


SPECS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(Hyperparameters)}


def _coerce(name: str, raw: Any) -> Any:
    spec = SPECS[name].metadata
    value = _decode(raw)
    if value is None and spec["optional"]:
        return None
    try:
        value = spec["coerce"](value, raw)
        if spec["check"] is not None:
            checked = spec["check"](value)
            if checked is not None:
                value = checked
    except _Invalid as exc:
        shown = raw if isinstance(raw, str) else json.dumps(raw)
        raise UserInputError(
            f"hyperparameter '{name}' has invalid value '{shorten(shown)}': it must be {exc}."
        ) from None
    return value


def parse_hyperparameters(raw: Mapping[str, Any]) -> Hyperparameters:
    """Parse hyperparameters.json's mapping into typed values; fail on unknown or bad keys."""
    values: dict[str, Any] = {}
    for name, value in raw.items():
        if name.startswith(PLATFORM_KEY_PREFIX) or name in PLATFORM_KEYS:
            continue
        if name not in SPECS:
            close = difflib.get_close_matches(name, SPECS, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else "see hyperparameters.example.json."
            raise UserInputError(f"unknown hyperparameter '{shorten(name)}'; {hint}")
        values[name] = _coerce(name, value)
    return Hyperparameters(**values)


def example_hyperparameters() -> dict[str, str]:
    """Every key with its default, in the plain-string form SageMaker's console sends."""
    example = {}
    for name, spec in SPECS.items():
        if spec.default is None:
            continue
        value = spec.default
        example[name] = str(value).lower() if isinstance(value, bool) else str(value)
    return example
