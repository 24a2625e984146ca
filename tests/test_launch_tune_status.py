"""`sm-effdet tune status|results|stop NAME` (issue 26 item 20), split from test_launch_jobs.py.

test_emulated_* run the real command against moto's server on 127.0.0.1 (the `aws` fixture).
moto implements CreateHyperParameterTuningJob and DescribeHyperParameterTuningJob (its status,
counters and best trial made up, never asserted) but not ListTrainingJobsForHyperParameterTuningJob
nor StopHyperParameterTuningJob (it answers 500 "has not been implemented"): those are tested
with botocore's own Stubber, which checks each request and response against SageMaker's model.
"""

from __future__ import annotations

import argparse
import csv
import io
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
import pytest
from botocore.stub import Stubber
from conftest import push_image

from sm_effdet.demo import make_shapes_dataset
from sm_effdet.launch import tuning_status
from sm_effdet.launch.cli import build_parser, route

REPO = Path(__file__).resolve().parents[1]
SM_EFFDET = REPO / "sm-effdet"
ACCOUNT = "123456789012"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/SageMakerRole"
BUCKET = "sm-effdet-tune-bucket"
IMAGE = f"{ACCOUNT}.dkr.ecr.us-east-1.amazonaws.com/sm-effdet:abc1234"
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def sm_effdet(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SM_EFFDET), *args], capture_output=True,
                          text=True, timeout=timeout)


def sagemaker_stubbed():
    client = boto3.client("sagemaker", region_name="us-east-1", aws_access_key_id="x",
                          aws_secret_access_key="x")
    return client, Stubber(client)


@pytest.fixture
def clients(aws):
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    push_image(IMAGE)  # tune checks in ECR that the image was pushed
    return {"s3": s3, "sagemaker": boto3.client("sagemaker")}


@pytest.fixture
def shapes(tmp_path) -> Path:
    make_shapes_dataset(tmp_path / "shapes", n_images=8, size=(64, 48))
    return tmp_path / "shapes"


def test_tune_words_are_routed_and_tune_still_launches():
    assert route(["tune", "status", "t-1"]) == ["tune-status", "t-1"]
    assert route(["tune", "--data", "d"]) == ["tune", "--data", "d"]
    assert route(["train", "status"]) == ["train", "status"]
    args = build_parser().parse_args(route(["tune", "results", "t-1", "--csv", "x.csv"]))
    assert (args.run, args.name, args.csv) == (tuning_status.run_results, "t-1", Path("x.csv"))
    launching = build_parser().parse_args(route(["tune", "--data", "d", "--max-jobs", "4"]))
    assert (launching.data, launching.max_jobs) == ("d", 4)
    help_text = sm_effdet("tune", "--help").stdout
    for words in ("sm-effdet tune status NAME", "sm-effdet tune results NAME",
                  "sm-effdet tune stop NAME"):
        assert words in " ".join(help_text.split())
    top = sm_effdet("--help").stdout
    assert "tune-status" not in top and "tune status" in " ".join(top.split())


def test_emulated_tune_no_wait_then_status(clients, shapes):
    done = sm_effdet("tune", "--data", str(shapes), "--validation", "s3://elsewhere/val/",
                     "--role", ROLE, "--bucket", BUCKET, "--image", IMAGE, "--name", "tune-a",
                     "--max-jobs", "6", "--max-parallel-jobs", "3", "--no-wait")
    assert done.returncode == 0, done.stderr
    assert "sm-effdet tune status tune-a" in done.stdout and "sm-effdet tune stop tune-a" in done.stdout
    status = sm_effdet("tune", "status", "tune-a")
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    # What the emulator echoes from the request; its status, counters and best trial are made up.
    assert lines[0].startswith("tuning job tune-a: ")
    assert lines[0].endswith("(Bayesian, 6 trials at most, 3 at a time)")
    assert lines[1] == "objective: validation:mAP (Maximize)"
    assert "`sm-effdet tune results tune-a`" in status.stdout
    unknown = sm_effdet("tune", "status", "no-such-tuning")
    assert unknown.returncode == 1 and "Traceback" not in unknown.stderr
    assert unknown.stderr.count("\n") == 1
    assert "there is no tuning job named no-such-tuning in region us-east-1" in unknown.stderr
    assert "aws sagemaker list-hyper-parameter-tuning-jobs" in unknown.stderr


def tuning_description(name: str, status: str, direction: str = "Maximize") -> dict:
    return {
        "HyperParameterTuningJobName": name,
        "HyperParameterTuningJobArn": f"arn:aws:sagemaker:us-east-1:{ACCOUNT}:hyper-parameter-tuning-job/{name}",
        "HyperParameterTuningJobConfig": {
            "Strategy": "Bayesian",
            "HyperParameterTuningJobObjective": {"Type": direction, "MetricName": "validation:mAP"},
            "ResourceLimits": {"MaxNumberOfTrainingJobs": 6, "MaxParallelTrainingJobs": 2},
        },
        "HyperParameterTuningJobStatus": status, "CreationTime": NOW,
        "TrainingJobStatusCounters": {"Completed": 3, "InProgress": 1, "RetryableError": 0,
                                      "NonRetryableError": 1, "Stopped": 0},
        "ObjectiveStatusCounters": {"Succeeded": 3, "Pending": 1, "Failed": 1},
    }


def trial(k: int, status: str, value: float | None, lr: str, size: str) -> dict:
    summary = {
        "TrainingJobName": f"tune-b-{k:03d}-0000abcd", "TrainingJobArn": f"arn:aws:sagemaker:"
        f"us-east-1:{ACCOUNT}:training-job/tune-b-{k:03d}-0000abcd",
        "CreationTime": NOW + timedelta(minutes=k), "TrainingJobStatus": status,
        "TunedHyperParameters": {"learning_rate": lr, "img_size": f'"{size}"'},
        "TrainingStartTime": NOW + timedelta(minutes=k),
        "TrainingEndTime": NOW + timedelta(minutes=k, seconds=100 * k),
    }
    if value is not None:
        summary["FinalHyperParameterTuningJobObjectiveMetric"] = {"MetricName": "validation:mAP",
                                                                  "Value": value}
    return summary


@pytest.mark.parametrize("direction", ["Maximize", "Minimize"])
def test_tune_results_lists_every_trial_best_first_stubbed(direction, tmp_path):
    trials = [trial(1, "Completed", 0.31, "0.001", "512"), trial(2, "Completed", 0.45, "0.003", "640"),
              trial(3, "Failed", None, "0.009", "384"), trial(4, "Completed", 0.12, "0.0002", "512"),
              trial(5, "InProgress", None, "0.002", "640")]
    client, stub = sagemaker_stubbed()
    stub.add_response("describe_hyper_parameter_tuning_job",
                      tuning_description("tune-b", "InProgress", direction),
                      {"HyperParameterTuningJobName": "tune-b"})
    # Two pages, as SageMaker pages a long list.
    stub.add_response("list_training_jobs_for_hyper_parameter_tuning_job",
                      {"TrainingJobSummaries": trials[:3], "NextToken": "page-2"},
                      {"HyperParameterTuningJobName": "tune-b"})
    stub.add_response("list_training_jobs_for_hyper_parameter_tuning_job",
                      {"TrainingJobSummaries": trials[3:]},
                      {"HyperParameterTuningJobName": "tune-b", "NextToken": "page-2"})
    out = io.StringIO()
    args = argparse.Namespace(name="tune-b", csv=tmp_path / "trials.csv")
    with stub:
        assert tuning_status.run_results(args, sagemaker=client, out=out) == 0
        stub.assert_no_pending_responses()
    scored = sorted((t for t in trials if "FinalHyperParameterTuningJobObjectiveMetric" in t),
                    key=lambda t: t["FinalHyperParameterTuningJobObjectiveMetric"]["Value"],
                    reverse=direction == "Maximize")
    unscored = sorted((t for t in trials if t not in scored), key=lambda t: t["CreationTime"],
                      reverse=True)
    expected = scored + unscored
    lines = out.getvalue().splitlines()
    assert lines[0] == f"tuning job tune-b: InProgress, 5 trials, validation:mAP ({direction}), best first"
    assert lines[1].split() == ["trial", "status", "validation:mAP", "seconds", "img_size",
                                "learning_rate"]
    for line, t in zip(lines[2:7], expected):
        value = (t.get("FinalHyperParameterTuningJobObjectiveMetric") or {}).get("Value")
        seconds = (t["TrainingEndTime"] - t["TrainingStartTime"]).total_seconds()
        assert line.split() == [t["TrainingJobName"], t["TrainingJobStatus"],
                                "-" if value is None else f"{value:.4f}", f"{seconds:.0f}",
                                t["TunedHyperParameters"]["img_size"].strip('"'),
                                t["TunedHyperParameters"]["learning_rate"]]
    assert lines[-1] == f"deploy the best: `sm-effdet deploy {expected[0]['TrainingJobName']}`"
    with (tmp_path / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["trial"] for r in rows] == [t["TrainingJobName"] for t in expected]
    assert rows[0]["start"] == str(expected[0]["TrainingStartTime"])


def test_tune_status_counts_and_best_so_far_stubbed():
    description = tuning_description("tune-c", "InProgress")
    best = trial(2, "Completed", 0.45, "0.003", "640")
    description["BestTrainingJob"] = best
    client, stub = sagemaker_stubbed()
    stub.add_response("describe_hyper_parameter_tuning_job", description,
                      {"HyperParameterTuningJobName": "tune-c"})
    out = io.StringIO()
    with stub:
        tuning_status.run_status(argparse.Namespace(name="tune-c"), sagemaker=client, out=out)
    text = out.getvalue()
    counts = description["TrainingJobStatusCounters"]
    assert (f"trials: {counts['Completed']} completed, {counts['InProgress']} in progress, "
            f"{counts['Stopped']} stopped, {counts['RetryableError']} failed (retryable), "
            f"{counts['NonRetryableError']} failed") in text
    assert f"best so far: {best['TrainingJobName']} validation:mAP=0.45 (learning_rate=0.003, img_size=640)" in text
    assert "stop it: `sm-effdet tune stop tune-c`" in text


def test_tune_stop_stops_only_a_running_tuning_job_stubbed():
    client, stub = sagemaker_stubbed()
    stub.add_response("describe_hyper_parameter_tuning_job", tuning_description("tune-d", "InProgress"),
                      {"HyperParameterTuningJobName": "tune-d"})
    stub.add_response("stop_hyper_parameter_tuning_job", {}, {"HyperParameterTuningJobName": "tune-d"})
    stub.add_response("describe_hyper_parameter_tuning_job", tuning_description("tune-d", "Stopping"),
                      {"HyperParameterTuningJobName": "tune-d"})
    out = io.StringIO()
    with stub:
        tuning_status.run_stop(argparse.Namespace(name="tune-d"), sagemaker=client, out=out)
        # The second call finds it Stopping: no second StopHyperParameterTuningJob is sent.
        tuning_status.run_stop(argparse.Namespace(name="tune-d"), sagemaker=client, out=out)
        stub.assert_no_pending_responses()
    first, second = out.getvalue().splitlines()
    assert first.startswith("stopping tune-d: SageMaker stops its running trials")
    assert second == "tuning job tune-d is already Stopping; nothing to stop."
