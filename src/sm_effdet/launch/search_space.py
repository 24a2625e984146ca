"""The tuning job's search space (the ranges file, the default space) and the rules of the
tuning strategies: what SageMaker refuses or misuses, refused here before anything is uploaded.

`parameter_ranges` turns the ranges file's form into SageMaker's ParameterRanges, checking each
value with the job's own parser; `check_tuning_job_rules` checks a whole
CreateHyperParameterTuningJob request (validation.check_request calls it): the scaling types'
domains, Hyperband's early stopping and resource, Grid's categorical ranges and trial count.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import UserInputError, shorten
from ..hyperparameters import DEFAULT_LEARNING_RATES, SPECS, parse_hyperparameters

# The static hyperparameters SageMaker reads Hyperband's MaxResource from when it is not given
# (HyperbandStrategyConfig.MaxResource in the model's docs).
HYPERBAND_RESOURCE_KEYS = ("epochs", "numepochs", "n-epochs", "n_epochs", "num_epochs")
HYPERBAND_MAX_RESOURCE = 20000  # "The maximum value is 20,000 epochs."
RANGE_KINDS = ("IntegerParameterRanges", "ContinuousParameterRanges")


# The default search space for fine-tuning a COCO-pretrained EfficientDet, in the ranges file's
# form (see `parameter_ranges`). Four knobs that move mAP most per trial on small datasets:
DEFAULT_SEARCH_SPACE: dict[str, Any] = {
    # A decade either side of AdamW's 0.001 (the job's 'auto'), searched on a log scale because
    # what matters is the factor, not the difference: 1e-4 barely moves pretrained weights in a
    # few epochs, 1e-2 is where AdamW fine-tuning starts to diverge.
    "learning_rate": {"min": 0.0001, "max": 0.01, "scaling": "Logarithmic"},
    # The parser takes multiples of 128 only, so a list rather than an integer range; 512 (the
    # default) in the middle. Memory grows with the square of the size: the instance type must
    # fit 640 at the job's batch_size.
    "img_size": [384, 512, 640],
    # Flips, scale and colour help small datasets and can cost a few points on large, uniform
    # ones: the tuner finds out which this dataset is.
    "augment": [True, False],
    # Linear from none to 3 epochs (the default is 1): more than that eats most of a short
    # fine-tuning schedule before the peak learning rate is reached.
    "warmup_epochs": {"min": 0, "max": 3, "scaling": "Linear"},
}
# SGD's learning rates are two orders larger (the job's 'auto' is 0.1 for sgd).
SGD_LEARNING_RATE = {"min": 0.003, "max": 0.3, "scaling": "Logarithmic"}
SCALING_TYPES = ("Auto", "Linear", "Logarithmic", "ReverseLogarithmic")


def default_search_space(static_hyperparameters: Mapping[str, str]) -> dict[str, Any]:
    def static(key: str) -> str:
        return str(static_hyperparameters.get(key, "")).strip('"').lower()

    space = dict(DEFAULT_SEARCH_SPACE)
    if static("optimizer") == "sgd":
        space["learning_rate"] = SGD_LEARNING_RATE
    elif static("pretrained") == "backbone":
        # Fresh BiFPN and heads take AdamW's higher 'auto' rate: the range is centred there, a
        # decade below and three times above.
        rate = DEFAULT_LEARNING_RATES["adamw"]["backbone"]
        space["learning_rate"] = {"min": rate / 10, "max": rate * 3, "scaling": "Logarithmic"}
    return space


def read_search_space(path: Path) -> dict[str, Any]:
    """The ranges file's entries (checked by `parameter_ranges`); null removes a default."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise UserInputError(
            f"cannot read the tuning ranges file {path}: {exc.strerror}."
        ) from None
    except ValueError as exc:
        raise UserInputError(
            f"the tuning ranges file {path} is not valid JSON ({exc}); see docs/launching.md, Tuning."
        ) from None
    if not isinstance(data, dict):
        raise UserInputError(
            f"the tuning ranges file {path} must hold a JSON object of hyperparameter names, e.g. "
            '{"learning_rate": {"min": 0.0001, "max": 0.01, "scaling": "Logarithmic"}}.'
        )
    return data


def merge_search_space(default: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    space = {**default, **overrides}
    return {name: entry for name, entry in space.items() if entry is not None}


def _as_text(value: Any) -> str:
    # The job's hyperparameters arrive as strings; JSON's true stays "true", never "True".
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _check_value(source: str, name: str, value: Any) -> None:
    try:
        parse_hyperparameters({name: _as_text(value)})
    except UserInputError as exc:
        raise UserInputError(f"{source}: {str(exc).rstrip('.')}.") from None


def _check_name(name: str, source: str) -> None:
    if name not in SPECS:
        raise UserInputError(
            f"{source} names '{shorten(name)}', which is not a hyperparameter of the job; use "
            "the names in hyperparameters.example.json."
        )


def _is_integer(name: str) -> bool:
    return str(SPECS[name].type).split("|")[0].strip() == "int"


def parameter_ranges(space: Mapping[str, Any], source: str = "the search space") -> dict:
    """SageMaker's ParameterRanges from `space`: a list is categorical, {"min", "max",
    "scaling"} a range (whole numbers when the job's hyperparameter is one). Every name must be
    a hyperparameter the job knows and every value one its parser accepts."""
    ranges: dict[str, list] = {
        "IntegerParameterRanges": [],
        "ContinuousParameterRanges": [],
        "CategoricalParameterRanges": [],
    }
    for name, entry in space.items():
        _check_name(name, source)
        if isinstance(entry, list):
            if not entry:
                raise UserInputError(
                    f"{source}: '{name}' has an empty list of values; give at least one."
                )
            for value in entry:
                _check_value(source, name, value)
            ranges["CategoricalParameterRanges"].append(
                {"Name": name, "Values": [_as_text(v) for v in entry]}
            )
        elif isinstance(entry, dict):
            ranges[_range_kind(name, entry, source)].append(_range(name, entry, source))
        else:
            raise UserInputError(
                f"{source}: '{name}' is {shorten(json.dumps(entry), 60)}; give a list of values or "
                '{"min": ..., "max": ...} (null removes it from the search).'
            )
    return {kind: items for kind, items in ranges.items() if items}


def _range_kind(name: str, entry: Mapping, source: str) -> str:
    unknown = set(entry) - {"min", "max", "scaling"}
    if unknown or "min" not in entry or "max" not in entry:
        raise UserInputError(
            f'{source}: the range of \'{name}\' must have "min" and "max" (and optionally '
            f'"scaling": one of {", ".join(SCALING_TYPES)}), not {", ".join(sorted(entry))}.'
        )
    return "IntegerParameterRanges" if _is_integer(name) else "ContinuousParameterRanges"


def _range(name: str, entry: Mapping, source: str) -> dict:
    low, high = entry["min"], entry["max"]
    scaling = entry.get("scaling", "Auto")
    for value in (low, high):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserInputError(f"{source}: the range of '{name}' needs numbers, not {value!r}.")
        _check_value(source, name, value)
    if not low < high:
        raise UserInputError(
            f"{source}: the range of '{name}' has min {low} not below max {high}; for one value "
            "set it with --set instead."
        )
    if scaling not in SCALING_TYPES:
        raise UserInputError(
            f"{source}: the scaling of '{name}' is {scaling!r}, not one of {', '.join(SCALING_TYPES)}."
        )
    problem = scaling_problem(scaling, low, high, integer=_is_integer(name))
    if problem:
        raise UserInputError(f"{source}: '{name}' {problem}.")
    if _is_integer(name):
        if int(low) != low or int(high) != high:
            raise UserInputError(
                f"{source}: '{name}' takes whole numbers; its min and max must be too."
            )
        low, high = int(low), int(high)
        # The tuner may pick any whole number between: each one must be one the job accepts
        # (img_size, say, takes only multiples of 128).
        for value in range(low, high + 1) if high - low <= 10_000 else ():
            try:
                parse_hyperparameters({name: str(value)})
            except UserInputError:
                raise UserInputError(
                    f"{source}: the tuner may pick {value} for '{name}' between {low} and {high}, "
                    "which the job refuses; give its values as a list instead."
                ) from None
    return {"Name": name, "MinValue": str(low), "MaxValue": str(high), "ScalingType": scaling}


def tuned_names(ranges: Mapping[str, list]) -> list[str]:
    return [item["Name"] for items in ranges.values() for item in items]


def scaling_problem(scaling: str, low: float, high: float, integer: bool) -> str | None:
    """Why SageMaker refuses this scaling for a range from `low` to `high`, as a phrase."""
    if scaling == "Logarithmic" and low <= 0:
        return (f"is searched on a Logarithmic scale, which takes values above 0 only; raise its "
                f"min ({low}) above 0 or use Linear")
    if scaling == "ReverseLogarithmic":
        if integer:
            return ("takes whole numbers, and ReverseLogarithmic scaling is for continuous ranges "
                    "only; use Linear or Logarithmic")
        if not (0 <= low and high < 1):
            return (f"is searched on a ReverseLogarithmic scale, which takes ranges within [0, 1) "
                    f"only, not {low} to {high}; use Logarithmic or Linear")
    return None


def grid_size(ranges: Mapping[str, list]) -> int:
    """The trials of a Grid search: every combination of the categorical values."""
    return math.prod(len(r["Values"]) for r in ranges.get("CategoricalParameterRanges") or [])


def _as_list(entry: Mapping[str, Any], integer: bool) -> list:
    low, high = float(entry["MinValue"]), float(entry["MaxValue"])
    if integer:
        low, high = int(low), int(high)
        return list(range(low, high + 1)) if high - low < 6 else [low, (low + high) // 2, high]
    if entry.get("ScalingType") == "Logarithmic":
        middle = math.sqrt(low * high)
    else:
        middle = (low + high) / 2
    return [low, float(f"{middle:.2g}"), high]


def grid_example(ranges: Mapping[str, list]) -> str:
    """The ranges as lists (three values, or every whole number of a short range), in the ranges
    file's form, for the sentence that refuses them with Grid."""
    example = {r["Name"]: _as_list(r, kind == "IntegerParameterRanges")
               for kind in RANGE_KINDS for r in ranges.get(kind) or []}
    return json.dumps(example)


def check_tuning_job_rules(params: Mapping[str, Any]) -> None:
    """The strategy rules a CreateHyperParameterTuningJob request must follow that botocore's
    validation leaves out (its docs state them; the API refuses or misuses the rest)."""
    config = params.get("HyperParameterTuningJobConfig") or {}
    strategy = config.get("Strategy")
    ranges = config.get("ParameterRanges") or {}
    for kind in RANGE_KINDS:
        for entry in ranges.get(kind) or []:
            problem = scaling_problem(entry.get("ScalingType", "Auto"), float(entry["MinValue"]),
                                      float(entry["MaxValue"]), kind == "IntegerParameterRanges")
            if problem:
                raise UserInputError(f"the tuned hyperparameter '{entry['Name']}' {problem}.")
    if strategy == "Hyperband":
        if config.get("TrainingJobEarlyStoppingType", "Off") != "Off":
            raise UserInputError(
                "the Hyperband strategy stops trials early by itself, and SageMaker requires "
                "TrainingJobEarlyStoppingType Off with it; drop --early-stopping Auto."
            )
        hyperband = (config.get("StrategyConfig") or {}).get("HyperbandStrategyConfig") or {}
        definitions = [params.get("TrainingJobDefinition")] + list(params.get("TrainingJobDefinitions") or [])
        for definition in filter(None, definitions):
            static = definition.get("StaticHyperParameters") or {}
            if "MaxResource" not in hyperband and not any(k in static for k in HYPERBAND_RESOURCE_KEYS):
                raise UserInputError(
                    "the Hyperband strategy needs the most epochs a trial may run: give "
                    "HyperbandStrategyConfig.MaxResource or a static 'epochs' hyperparameter."
                )
    elif config.get("StrategyConfig"):
        raise UserInputError(f"StrategyConfig is for the Hyperband strategy only, not {strategy}; "
                             "leave it out.")
    if strategy == "Grid":
        ranged = [r["Name"] for kind in RANGE_KINDS for r in ranges.get(kind) or []]
        if ranged:
            raise UserInputError(
                f"the Grid strategy searches categorical values only, but {' and '.join(ranged)} "
                f"{'is a range' if len(ranged) == 1 else 'are ranges'}; give "
                f"{'it' if len(ranged) == 1 else 'them'} as lists in --ranges, e.g. "
                f"{grid_example(ranges)}, or choose another --strategy."
            )
        limits = config.get("ResourceLimits") or {}
        wanted = limits.get("MaxNumberOfTrainingJobs")
        if wanted is not None and wanted != grid_size(ranges):
            raise UserInputError(
                f"the Grid strategy runs every combination of the values, {grid_size(ranges)} "
                f"trials here, and SageMaker requires MaxNumberOfTrainingJobs (--max-jobs) to be "
                f"that number, not {wanted}; leave --max-jobs out."
            )
