"""`sm-effdet tune`: a SageMaker hyperparameter tuning job from the same spec as `train`.

The training request `train` would send is built and checked first (same flags, same local
checks); the tuning job's TrainingJobDefinition is derived from it, so a trial runs exactly the
job `train` would run, with the tuned hyperparameters set by SageMaker. The tuning request is
checked too (search_space.py holds the ranges and the strategies' rules) before anything is
uploaded or created.
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
from ..hyperparameters import parse_hyperparameters
from .search_space import (  # noqa: F401  (the names tests and callers know from here)
    DEFAULT_SEARCH_SPACE,
    HYPERBAND_MAX_RESOURCE,
    SCALING_TYPES,
    SGD_LEARNING_RATE,
    _check_name,
    default_search_space,
    grid_size,
    merge_search_space,
    parameter_ranges,
    read_search_space,
    tuned_names,
)
from .validation import check_request

# The one MetricDefinitions name (metric_definitions.json) that is the job's validation mAP.
OBJECTIVE_METRIC = "validation:mAP"
NAME_LIMIT = 32  # CreateHyperParameterTuningJob's HyperParameterTuningJobName maximum
PROJECT = "sm-effdet"
TERMINAL = ("Completed", "Failed", "Stopped")

DEFAULT_MAX_JOBS = 12
STRATEGIES = ("Bayesian", "Random", "Hyperband", "Grid")


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
    max_jobs: int | None,
    max_parallel_jobs: int,
    strategy: str = "Bayesian",
    early_stopping: str | None = None,
) -> dict:
    """The CreateHyperParameterTuningJob request whose trials run `training_request` with the
    tuned hyperparameters; checked before it is returned. What a strategy requires is set when
    left open (None): Hyperband runs with early stopping Off and its MaxResource from epochs,
    Grid with every combination as its number of trials; a contrary choice is refused."""
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
    static = {k: v for k, v in (training_request.get("HyperParameters") or {}).items()
              if k not in tuned}
    definition: dict[str, Any] = {
        "AlgorithmSpecification": {k: algorithm[k] for k in ALGORITHM_FIELDS if k in algorithm},
        "StaticHyperParameters": static,
    }
    definition.update({k: training_request[k] for k in CARRIED_FIELDS if k in training_request})
    checkpoint = _trial_checkpoint(training_request, name)
    if checkpoint:
        definition["CheckpointConfig"] = checkpoint
    if early_stopping is None:
        early_stopping = "Off" if strategy == "Hyperband" else "Auto"
    if max_jobs is None:
        max_jobs = grid_size(parameter_ranges) if strategy == "Grid" else DEFAULT_MAX_JOBS
    config: dict[str, Any] = {
        "Strategy": strategy,
        "HyperParameterTuningJobObjective": {"Type": "Maximize", "MetricName": OBJECTIVE_METRIC},
        "ResourceLimits": {
            "MaxNumberOfTrainingJobs": max_jobs,
            "MaxParallelTrainingJobs": max_parallel_jobs,
        },
        "ParameterRanges": dict(parameter_ranges),
        "TrainingJobEarlyStoppingType": early_stopping,
    }
    if strategy == "Hyperband":
        config["StrategyConfig"] = {"HyperbandStrategyConfig": _hyperband(static, tuned)}
    request: dict[str, Any] = {
        "HyperParameterTuningJobName": name,
        "HyperParameterTuningJobConfig": config,
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


def _hyperband(static: Mapping[str, str], tuned: set[str]) -> dict[str, int]:
    """Hyperband stops a trial between MinResource and MaxResource epochs: at most the job's
    epochs (each trial's epoch line is the resource it counts), from the first epoch on."""
    if "epochs" in tuned:
        raise UserInputError(
            "the Hyperband strategy decides how many epochs each trial runs, up to the job's "
            "epochs; set epochs with --set (the most a trial may run) instead of tuning it."
        )
    epochs = parse_hyperparameters(static).epochs
    if epochs > HYPERBAND_MAX_RESOURCE:
        raise UserInputError(
            f"the Hyperband strategy allows at most {HYPERBAND_MAX_RESOURCE} epochs a trial, not "
            f"epochs={epochs}; lower epochs."
        )
    return {"MinResource": 1, "MaxResource": epochs}


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
        "Takes train's flags but --local; --name is the tuning job's (at most 32 characters).",
        epilog="A tuning job launched (with --no-wait or elsewhere): `sm-effdet tune status "
        "NAME` (status, trial counts, best so far), `sm-effdet tune results NAME [--csv FILE]` "
        "(every trial, best first), `sm-effdet tune stop NAME`.",
    )
    job_request.add_job_arguments(parser, command="tune")
    parser.add_argument(
        "--ranges",
        type=Path,
        metavar="FILE",
        help='JSON overriding the default search space: {"name": [values] | {"min", "max", '
        '"scaling"} | null}',
    )
    parser.add_argument("--max-jobs", type=int, metavar="N",
                        help=f"trials in all (default {DEFAULT_MAX_JOBS}; with Grid, every "
                        "combination of the values)")
    parser.add_argument(
        "--max-parallel-jobs",
        type=int,
        default=2,
        metavar="N",
        help="trials at once (default 2: Bayesian search learns from finished trials)",
    )
    parser.add_argument(
        "--strategy", default="Bayesian", choices=STRATEGIES,
        help="how trials are chosen (default Bayesian); Grid takes lists of values only, "
        "Hyperband stops trials itself",
    )
    parser.add_argument("--early-stopping", choices=("Auto", "Off"),
                        help="stop trials unlikely to beat the best (default Auto; Off with "
                        "Hyperband, which SageMaker requires)")
    parser.add_argument(
        "--no-wait", action="store_true", help="create the tuning job and return (like train's)"
    )
    parser.set_defaults(run=run_tune)


def check_scored(plan, static: Mapping[str, str], has_validation: bool, out: TextIO) -> None:
    """Every trial must print the objective: a job without validation images never does, and
    SageMaker would run (and bill) every trial for nothing."""
    if plan.validation_images == 0:
        raise UserInputError(
            f"no trial could be scored: the training data has no validation images (val_fraction="
            f"{parse_hyperparameters(static).val_fraction:g}, no validation channel), so no job "
            f"prints {OBJECTIVE_METRIC}, the tuning objective; pass --validation, or set "
            "val_fraction above 0 for enough images to be held out."
        )
    hp = parse_hyperparameters(static)
    if plan.validation_images is None and not has_validation and not hp.split_file \
            and hp.val_fraction == 0:
        print(f"note: with val_fraction=0 and no validation channel, trials print "
              f"{OBJECTIVE_METRIC} only if the data on S3 carries its own split (VOC ImageSets, a "
              "data.yaml's val, valid/ folders); it was not read here.", file=sys.stderr)


def run_tune(args, *, sagemaker=None, s3=None, ecr=None, out: TextIO = sys.stdout) -> int:
    """Plan the training job (every local check), build and check the tuning request, and only
    then check the image, the bucket and the datasets' prefixes on AWS, upload and create."""
    from . import request as job_request

    if getattr(args, "local", False):
        raise UserInputError(
            "tune runs on SageMaker only; try one trial's settings first with train --local."
        )
    if args.name:
        check_tuning_name(args.name)
    overrides = read_search_space(args.ranges) if args.ranges else {}
    source = f"the tuning ranges file {args.ranges}" if args.ranges else "the search space"
    # Refused before the data is read; a null entry (removing a default) still names one.
    for name in overrides:
        _check_name(name, source)
    parameter_ranges(merge_search_space({}, overrides), source)
    dry_run = getattr(args, "dry_run", False)
    plan = job_request.plan_training(args, out=sys.stderr if dry_run else out)
    training = plan.request
    static = training.get("HyperParameters") or {}
    ranges = parameter_ranges(merge_search_space(default_search_space(static), overrides), source)
    backbone = parse_hyperparameters(static).backbone
    name = args.name or tuning_job_name(backbone)
    request = tuning_job_request(
        training,
        name=name,
        parameter_ranges=ranges,
        max_jobs=args.max_jobs,
        max_parallel_jobs=args.max_parallel_jobs,
        strategy=args.strategy,
        early_stopping=args.early_stopping,
    )
    check_scored(plan, {k: v for k, v in static.items() if k not in tuned_names(ranges)},
                 bool(args.validation), out)
    for tuned in tuned_names(ranges):
        if tuned in static:
            # On stderr for --dry-run, whose stdout is the request alone.
            print(
                f"{tuned} is tuned: its value {static[tuned]!r} is not used.",
                file=sys.stderr if dry_run else out,
            )
    if dry_run:
        print(f"note: the image {plan.image} was not checked in ECR (--dry-run calls nothing).",
              file=sys.stderr)
        print(json.dumps(request, indent=2), file=out)
        return 0
    from .aws import client

    sagemaker = sagemaker or client("sagemaker")
    s3 = s3 or client("s3")
    job_request.carry_out(plan, s3=s3, ecr=ecr or (lambda region: client("ecr", region)),
                          sync=args.sync, out=out)
    sagemaker.create_hyper_parameter_tuning_job(**request)
    trials = request["HyperParameterTuningJobConfig"]["ResourceLimits"]["MaxNumberOfTrainingJobs"]
    print(
        f"Created tuning job {name}: {trials} trials, {args.max_parallel_jobs} at a time.",
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
