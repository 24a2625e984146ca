"""`sm-effdet tune status|results|stop NAME`: a tuning job after `tune --no-wait`.

`results` prints what the SageMaker SDK's `HyperparameterTuner.attach(NAME).analytics()`
dataframe holds (each trial's name, status, objective value, training time and tuned
hyperparameters), best first. `tune` itself takes every flag of a job and no positional, so the
CLI routes `tune status ...` to the `tune-status` parser registered here (cli.route).
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from ..errors import UserInputError

ACTIVE = ("InProgress", "Stopping")


def add_commands(subparsers) -> None:
    # No help=: argparse lists a subparser only when it has one; `tune --help` names these.
    status = subparsers.add_parser(
        "tune-status", prog="sm-effdet tune status",
        description="A tuning job's status, trial counts and best trial so far.")
    status.add_argument("name", metavar="NAME", help="the tuning job's name")
    status.set_defaults(run=run_status)

    results = subparsers.add_parser(
        "tune-results", prog="sm-effdet tune results",
        description="Every trial of a tuning job, best first: name, status, objective value, "
        "training seconds and the tuned hyperparameters (as the SageMaker SDK's "
        "HyperparameterTuner.attach(NAME).analytics().dataframe() has them).")
    results.add_argument("name", metavar="NAME", help="the tuning job's name")
    results.add_argument("--csv", type=Path, metavar="FILE",
                         help="also write the table, with start and end times, as CSV")
    results.set_defaults(run=run_results)

    stop = subparsers.add_parser(
        "tune-stop", prog="sm-effdet tune stop",
        description="Stop a tuning job: SageMaker stops its running trials (each saves a "
        "checkpoint) and starts no more.")
    stop.add_argument("name", metavar="NAME", help="the tuning job's name")
    stop.set_defaults(run=run_stop)


def describe(sagemaker, name: str) -> dict[str, Any]:
    from .aws import named

    with named("tuning job", name, sagemaker.meta.region_name,
               "aws sagemaker list-hyper-parameter-tuning-jobs"):
        return sagemaker.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=name)


def _objective(description: Mapping[str, Any]) -> tuple[str, str]:
    objective = description["HyperParameterTuningJobConfig"].get(
        "HyperParameterTuningJobObjective") or {}
    return objective.get("MetricName", "objective"), objective.get("Type", "Maximize")


def _value(trial: Mapping[str, Any]) -> float | None:
    return (trial.get("FinalHyperParameterTuningJobObjectiveMetric") or {}).get("Value")


def _tuned(trial: Mapping[str, Any]) -> dict[str, str]:
    # Categorical values come back JSON-quoted ('"512"'), as the tuner passed them.
    return {k: str(v).strip('"') for k, v in (trial.get("TunedHyperParameters") or {}).items()}


def _elapsed(trial: Mapping[str, Any]) -> float | None:
    start, end = trial.get("TrainingStartTime"), trial.get("TrainingEndTime")
    if isinstance(start, datetime) and isinstance(end, datetime):
        return (end - start).total_seconds()
    return None


def status_text(description: Mapping[str, Any]) -> str:
    name = description["HyperParameterTuningJobName"]
    config = description["HyperParameterTuningJobConfig"]
    limits = config.get("ResourceLimits") or {}
    metric, direction = _objective(description)
    lines = [
        f"tuning job {name}: {description['HyperParameterTuningJobStatus']} ("
        f"{config.get('Strategy', '?')}, {limits.get('MaxNumberOfTrainingJobs', '?')} trials at "
        f"most, {limits.get('MaxParallelTrainingJobs', '?')} at a time)",
        f"objective: {metric} ({direction})",
    ]
    counts = description.get("TrainingJobStatusCounters") or {}
    lines.append("trials: " + ", ".join(
        f"{counts.get(k, 0)} {label}" for k, label in (
            ("Completed", "completed"), ("InProgress", "in progress"), ("Stopped", "stopped"),
            ("RetryableError", "failed (retryable)"), ("NonRetryableError", "failed"))))
    best = description.get("BestTrainingJob")
    if best and _value(best) is not None:
        tuned = ", ".join(f"{k}={v}" for k, v in _tuned(best).items())
        lines.append(f"best so far: {best['TrainingJobName']} {metric}={_value(best):.4g} ({tuned})")
    else:
        lines.append("best so far: none (no trial has reported the objective yet)")
    if description.get("FailureReason"):
        lines.append(f"failure reason: {description['FailureReason']}")
    return "\n".join(lines)


def list_trials(sagemaker, name: str) -> list[dict]:
    paginator = sagemaker.get_paginator("list_training_jobs_for_hyper_parameter_tuning_job")
    return [trial for page in paginator.paginate(HyperParameterTuningJobName=name)
            for trial in page.get("TrainingJobSummaries", [])]


def best_first(trials: list[dict], direction: str) -> list[dict]:
    """Trials with an objective value, best first; then the rest, newest first."""
    scored = [t for t in trials if _value(t) is not None]
    rest = [t for t in trials if _value(t) is None]
    scored.sort(key=lambda t: (_value(t), t["TrainingJobName"]), reverse=direction == "Maximize")
    rest.sort(key=lambda t: str(t.get("CreationTime", "")), reverse=True)
    return scored + rest


def table_rows(trials: list[dict], metric: str) -> tuple[list[str], list[list[str]]]:
    names = sorted({k for t in trials for k in _tuned(t)})
    header = ["trial", "status", metric, "seconds", *names]
    rows = []
    for trial in trials:
        value, elapsed, tuned = _value(trial), _elapsed(trial), _tuned(trial)
        rows.append([trial["TrainingJobName"], trial.get("TrainingJobStatus", "?"),
                     "-" if value is None else f"{value:.4f}",
                     "-" if elapsed is None else f"{elapsed:.0f}",
                     *(tuned.get(n, "-") for n in names)])
    return header, rows


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[k]) for row in [header, *rows]) for k in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                     for row in [header, *rows])


def check_csv_path(path: Path) -> None:
    from .folders import check_output_folder

    if path.is_dir():
        raise UserInputError(f"--csv {path} is a folder; give a file name, e.g. {path}/trials.csv.")
    check_output_folder(path.parent, "the folder of --csv")


def write_csv(path: Path, trials: list[dict], metric: str) -> None:
    header, rows = table_rows(trials, metric)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*header[:4], "start", "end", *header[4:]])
        for trial, row in zip(trials, rows):
            times = [str(trial.get(k) or "") for k in ("TrainingStartTime", "TrainingEndTime")]
            writer.writerow([*row[:4], *times, *row[4:]])


def run_status(args: argparse.Namespace, *, sagemaker=None, out: TextIO = sys.stdout) -> int:
    sagemaker = sagemaker or _client()
    description = describe(sagemaker, args.name)
    print(status_text(description), file=out)
    if description["HyperParameterTuningJobStatus"] in ACTIVE:
        print(f"every trial: `sm-effdet tune results {args.name}`; stop it: `sm-effdet tune "
              f"stop {args.name}`", file=out)
    else:
        print(f"every trial: `sm-effdet tune results {args.name}`", file=out)
        best = description.get("BestTrainingJob")
        if best and _value(best) is not None:
            print(f"deploy the best: `sm-effdet deploy {best['TrainingJobName']}`", file=out)
    return 0


def run_results(args: argparse.Namespace, *, sagemaker=None, out: TextIO = sys.stdout) -> int:
    if args.csv:
        check_csv_path(args.csv)
    sagemaker = sagemaker or _client()
    description = describe(sagemaker, args.name)
    metric, direction = _objective(description)
    trials = best_first(list_trials(sagemaker, args.name), direction)
    print(f"tuning job {args.name}: {description['HyperParameterTuningJobStatus']}, "
          f"{len(trials)} trials, {metric} ({direction}), best first", file=out)
    if trials:
        print(format_table(*table_rows(trials, metric)), file=out)
    if args.csv:
        write_csv(args.csv, trials, metric)
        print(f"written: {args.csv}", file=out)
    if trials and _value(trials[0]) is not None:
        print(f"deploy the best: `sm-effdet deploy {trials[0]['TrainingJobName']}`", file=out)
    return 0


def run_stop(args: argparse.Namespace, *, sagemaker=None, out: TextIO = sys.stdout) -> int:
    sagemaker = sagemaker or _client()
    status = describe(sagemaker, args.name)["HyperParameterTuningJobStatus"]
    if status != "InProgress":
        print(f"tuning job {args.name} is already {status}; nothing to stop.", file=out)
        return 0
    sagemaker.stop_hyper_parameter_tuning_job(HyperParameterTuningJobName=args.name)
    print(f"stopping {args.name}: SageMaker stops its running trials (each saves a checkpoint) "
          f"and starts no more; see it with `sm-effdet tune status {args.name}`.", file=out)
    return 0


def _client():
    from .aws import client

    return client("sagemaker")
