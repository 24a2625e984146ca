"""`sm-effdet tune`: a SageMaker hyperparameter tuning job from the same spec as `train`.

The training request `train` would send is built first (same flags, same local checks, same
upload); the tuning job's TrainingJobDefinition is derived from it, so a trial runs exactly the
job `train` would run, with the tuned hyperparameters set by SageMaker.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from ..errors import UserInputError, shorten
from ..hyperparameters import SPECS, parse_hyperparameters
from .validation import check_request

# The one MetricDefinitions name (metric_definitions.json) that is the job's validation mAP.
OBJECTIVE_METRIC = "validation:mAP"
NAME_LIMIT = 32  # CreateHyperParameterTuningJob's HyperParameterTuningJobName maximum
PROJECT = "sm-effdet"
TERMINAL = ("Completed", "Failed", "Stopped")

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
    space = dict(DEFAULT_SEARCH_SPACE)
    if str(static_hyperparameters.get("optimizer", "")).strip('"').lower() == "sgd":
        space["learning_rate"] = SGD_LEARNING_RATE
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
    if scaling in ("Logarithmic", "ReverseLogarithmic") and low <= 0:
        raise UserInputError(
            f"{source}: '{name}' is searched on a log scale, so its min must be above 0, not {low}."
        )
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


def tuning_job_name(backbone: str, now: datetime | None = None) -> str:
    """`sm-effdet-<backbone>-<UTC time>`, the backbone shortened to fit the 32 characters."""
    stamp = (now or datetime.now(UTC)).strftime("%y%m%d-%H%M%S")
    room = NAME_LIMIT - len(PROJECT) - len(stamp) - 2
    short = re.sub(r"[^a-zA-Z0-9]+", "-", backbone.rsplit(".", 1)[-1]).strip("-")[:room].strip("-")
    return "-".join(part for part in (PROJECT, short, stamp) if part)


def check_tuning_name(name: str) -> None:
    if len(name) > NAME_LIMIT:
        raise UserInputError(
            f"the tuning job name '{shorten(name, 80)}' is {len(name)} characters long; SageMaker "
            f"allows {NAME_LIMIT} for a tuning job (its trials add a suffix): shorten --name."
        )


def _trial_checkpoint(training_request: Mapping[str, Any], name: str) -> dict | None:
    checkpoint = training_request.get("CheckpointConfig")
    if not checkpoint:
        return None
    uri = checkpoint["S3Uri"].rstrip("/")
    job = training_request.get("TrainingJobName")
    if job and uri.endswith("/" + job):
        uri = uri[: -len(job) - 1]
    # One definition serves every trial: the tuning job's own folder keeps its trials apart
    # from other jobs' checkpoints, and the job itself checkpoints a trial below its own name
    # (job.trial_checkpoint_dir), so trials never share checkpoint files.
    return {**checkpoint, "S3Uri": f"{uri}/{name}/"}


# What CreateTrainingJob and a HyperParameterTrainingJobDefinition share, copied as they are.
CARRIED_FIELDS = (
    "RoleArn",
    "InputDataConfig",
    "VpcConfig",
    "OutputDataConfig",
    "ResourceConfig",
    "StoppingCondition",
    "EnableNetworkIsolation",
    "EnableInterContainerTrafficEncryption",
    "EnableManagedSpotTraining",
    "RetryStrategy",
    "Environment",
)
ALGORITHM_FIELDS = ("TrainingImage", "TrainingInputMode", "AlgorithmName", "MetricDefinitions")


def tuning_job_request(
    training_request: Mapping[str, Any],
    *,
    name: str,
    parameter_ranges: Mapping[str, list],
    max_jobs: int,
    max_parallel_jobs: int,
    strategy: str = "Bayesian",
    early_stopping: str = "Auto",
) -> dict:
    """The CreateHyperParameterTuningJob request whose trials run `training_request` with the
    tuned hyperparameters; checked before it is returned."""
    check_tuning_name(name)
    algorithm = training_request.get("AlgorithmSpecification") or {}
    metric_names = [m["Name"] for m in algorithm.get("MetricDefinitions") or []]
    if OBJECTIVE_METRIC not in metric_names:
        raise UserInputError(
            f"the training request has no metric named {OBJECTIVE_METRIC} in its "
            "MetricDefinitions, so the tuner could not read the objective; keep "
            "metric_definitions.json's definitions in the request."
        )
    tuned = set(tuned_names(parameter_ranges))
    definition: dict[str, Any] = {
        "AlgorithmSpecification": {k: algorithm[k] for k in ALGORITHM_FIELDS if k in algorithm},
        "StaticHyperParameters": {
            k: v
            for k, v in (training_request.get("HyperParameters") or {}).items()
            if k not in tuned
        },
    }
    definition.update({k: training_request[k] for k in CARRIED_FIELDS if k in training_request})
    checkpoint = _trial_checkpoint(training_request, name)
    if checkpoint:
        definition["CheckpointConfig"] = checkpoint
    request: dict[str, Any] = {
        "HyperParameterTuningJobName": name,
        "HyperParameterTuningJobConfig": {
            "Strategy": strategy,
            "HyperParameterTuningJobObjective": {
                "Type": "Maximize",
                "MetricName": OBJECTIVE_METRIC,
            },
            "ResourceLimits": {
                "MaxNumberOfTrainingJobs": max_jobs,
                "MaxParallelTrainingJobs": max_parallel_jobs,
            },
            "ParameterRanges": dict(parameter_ranges),
            "TrainingJobEarlyStoppingType": early_stopping,
        },
        "TrainingJobDefinition": definition,
    }
    if training_request.get("Tags"):
        request["Tags"] = training_request["Tags"]
    if max_parallel_jobs > max_jobs:
        raise UserInputError(
            f"--max-parallel-jobs ({max_parallel_jobs}) is above --max-jobs ({max_jobs}); lower it."
        )
    check_request("CreateHyperParameterTuningJob", request)
    return request


# --- Following ---------------------------------------------------------------------------


def list_trials(sagemaker, name: str) -> list[dict]:
    paginator = sagemaker.get_paginator("list_training_jobs_for_hyper_parameter_tuning_job")
    trials: list[dict] = []
    for page in paginator.paginate(HyperParameterTuningJobName=name):
        trials.extend(page.get("TrainingJobSummaries", []))
    return sorted(trials, key=lambda t: (str(t.get("CreationTime", "")), t["TrainingJobName"]))


def _objective(trial: Mapping[str, Any]) -> str:
    metric = trial.get("FinalHyperParameterTuningJobObjectiveMetric") or {}
    return f"{metric['Value']:.4f}" if "Value" in metric else "-"


def trial_table(trials: list[Mapping[str, Any]], tuned: list[str]) -> str:
    """One line per trial: name, status, objective value, the tuned values."""
    header = ["trial", "status", OBJECTIVE_METRIC, *tuned]
    rows = [header]
    for trial in trials:
        values = trial.get("TunedHyperParameters") or {}
        rows.append(
            [
                trial["TrainingJobName"],
                trial.get("TrainingJobStatus", "?"),
                _objective(trial),
                *(str(values.get(name, "-")).strip('"') for name in tuned),
            ]
        )
    widths = [max(len(row[k]) for row in rows) for k in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows
    )


def best_trial_text(description: Mapping[str, Any]) -> str:
    best = description.get("BestTrainingJob")
    if not best:
        return "No trial reported the objective; see each trial with sm-effdet logs TRIAL."
    values = ", ".join(
        f"{k}={str(v).strip(chr(34))}" for k, v in (best.get("TunedHyperParameters") or {}).items()
    )
    return (
        f"Best trial: {best['TrainingJobName']} {OBJECTIVE_METRIC}={_objective(best)} ({values}); "
        f"deploy it with: sm-effdet deploy {best['TrainingJobName']}"
    )


def follow_tuning_job(
    sagemaker,
    name: str,
    *,
    out: TextIO = sys.stdout,
    poll_seconds: float = 60,
    sleep=time.sleep,
) -> int:
    """Print the trial table whenever it changes, then the best trial; 0 when Completed."""
    shown = None
    while True:
        description = sagemaker.describe_hyper_parameter_tuning_job(
            HyperParameterTuningJobName=name
        )
        status = description["HyperParameterTuningJobStatus"]
        ranges = description["HyperParameterTuningJobConfig"].get("ParameterRanges") or {}
        table = trial_table(list_trials(sagemaker, name), tuned_names(ranges))
        if (status, table) != shown:
            stamp = datetime.now(UTC).strftime("%H:%M:%S")
            print(f"{stamp} {name}: {status}\n{table}", file=out, flush=True)
            shown = (status, table)
        if status in TERMINAL:
            break
        sleep(poll_seconds)
    print(best_trial_text(description), file=out, flush=True)
    if status != "Completed":
        reason = description.get("FailureReason") or "no reason given"
        print(f"sm-effdet: tuning job {name} ended {status}: {reason}", file=sys.stderr)
        return 1
    return 0


# --- The command -------------------------------------------------------------------------


def add_commands(subparsers) -> None:
    from . import request as job_request

    parser = subparsers.add_parser(
        "tune",
        help="a SageMaker hyperparameter tuning job of the train job; then tune status, tune "
        "results, tune stop NAME",
        description="Tune the job `train` would launch: objective validation:mAP (Maximize). "
        "Takes every flag of train; --name is the tuning job's (at most 32 characters).",
        epilog="A tuning job launched (with --no-wait or elsewhere): `sm-effdet tune status "
        "NAME` (status, trial counts, best so far), `sm-effdet tune results NAME [--csv FILE]` "
        "(every trial, best first), `sm-effdet tune stop NAME`.",
    )
    job_request.add_job_arguments(parser)
    parser.add_argument(
        "--ranges",
        type=Path,
        metavar="FILE",
        help='JSON overriding the default search space: {"name": [values] | {"min", "max", '
        '"scaling"} | null}',
    )
    parser.add_argument("--max-jobs", type=int, default=12, help="trials in all (default 12)")
    parser.add_argument(
        "--max-parallel-jobs",
        type=int,
        default=2,
        help="trials at once (default 2: Bayesian search learns from finished trials)",
    )
    parser.add_argument(
        "--strategy",
        default="Bayesian",
        choices=("Bayesian", "Random", "Hyperband", "Grid"),
    )
    parser.add_argument("--early-stopping", default="Auto", choices=("Auto", "Off"))
    parser.add_argument(
        "--no-wait", action="store_true", help="create the tuning job and return (like train's)"
    )
    parser.set_defaults(run=run_tune)


def run_tune(args, *, sagemaker=None, s3=None, out: TextIO = sys.stdout) -> int:
    from . import request as job_request

    if getattr(args, "local", False):
        raise UserInputError(
            "tune runs on SageMaker only; try one trial's settings first with train --local."
        )
    if args.name:
        check_tuning_name(args.name)
    overrides = read_search_space(args.ranges) if args.ranges else {}
    source = f"the tuning ranges file {args.ranges}" if args.ranges else "the search space"
    # Refused before anything is uploaded; a null entry (removing a default) still names one.
    for name in overrides:
        _check_name(name, source)
    parameter_ranges(merge_search_space({}, overrides), source)
    if sagemaker is None or s3 is None:
        from .aws import client

        sagemaker = sagemaker or client("sagemaker")
        s3 = s3 or client("s3")
    training = job_request.prepare_training_request(args, s3=s3, out=out)
    static = training.get("HyperParameters") or {}
    ranges = parameter_ranges(merge_search_space(default_search_space(static), overrides), source)
    backbone = parse_hyperparameters(static).backbone
    name = args.name or tuning_job_name(backbone)
    dry_run = getattr(args, "dry_run", False)
    for tuned in tuned_names(ranges):
        if tuned in static:
            # On stderr for --dry-run, whose stdout is the request alone.
            print(
                f"{tuned} is tuned: its value {static[tuned]!r} is not used.",
                file=sys.stderr if dry_run else out,
            )
    request = tuning_job_request(
        training,
        name=name,
        parameter_ranges=ranges,
        max_jobs=args.max_jobs,
        max_parallel_jobs=args.max_parallel_jobs,
        strategy=args.strategy,
        early_stopping=args.early_stopping,
    )
    if dry_run:
        print(json.dumps(request, indent=2), file=out)
        return 0
    sagemaker.create_hyper_parameter_tuning_job(**request)
    print(
        f"Created tuning job {name}: {args.max_jobs} trials, {args.max_parallel_jobs} at a time.",
        file=out,
    )
    if getattr(args, "no_wait", False):
        print(
            f"See it: sm-effdet tune status {name}; every trial: sm-effdet tune results {name}; "
            f"stop it: sm-effdet tune stop {name}",
            file=out,
        )
        return 0
    try:
        return follow_tuning_job(sagemaker, name, out=out)
    except KeyboardInterrupt:
        print(
            f"\nStopped following; tuning job {name} goes on. See it: sm-effdet tune status "
            f"{name}; every trial: sm-effdet tune results {name}; stop it: sm-effdet tune stop "
            f"{name}",
            file=out,
        )
        return 130
