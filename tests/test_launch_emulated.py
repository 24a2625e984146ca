"""Emulated tests: the real `sm-effdet` command against moto's server on 127.0.0.1 (S3,
SageMaker, CloudWatch Logs; the `aws` fixture). No AWS account is involved.

What is real: the command, its processes and signals, botocore's requests, moto's S3 objects
and CloudWatch Logs events. What moto makes up (a job is Completed at once, its metrics and
times) is never asserted; where a test needs a job that is still running or has failed, it sets
the state of moto's job itself (moto's server runs in this process) and says so.
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import boto3
import pytest
from conftest import push_image, sigint_as_a_terminal_sends_it

from sm_effdet.demo import make_shapes_dataset
from sm_effdet.launch.images import default_image

REPO = Path(__file__).resolve().parents[1]
SM_EFFDET = REPO / "sm-effdet"
ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"
BUCKET = "sm-effdet-test-bucket"
LOG_GROUP = "/aws/sagemaker/TrainingJobs"


def sm_effdet(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SM_EFFDET), *args], capture_output=True,
                          text=True, timeout=timeout)


def train_args(data: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--role", ROLE, "--bucket", BUCKET,
            "--set", "epochs=1", "--no-wait", *extra]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data") / "shapes"
    make_shapes_dataset(folder, n_images=8)
    return folder


@pytest.fixture
def clients(aws):
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    # The default image (the checkout's commit), pushed as `make push` would: train checks it.
    push_image(default_image("123456789012", "us-east-1"))
    return {"s3": s3, "sagemaker": boto3.client("sagemaker"), "logs": boto3.client("logs")}


def objects(s3) -> dict[str, int]:
    found = {}
    for bucket in s3.list_buckets()["Buckets"]:
        for item in s3.list_objects_v2(Bucket=bucket["Name"]).get("Contents", []):
            found[f"{bucket['Name']}/{item['Key']}"] = item["Size"]
    return found


def moto_job(name: str):
    """moto's own record of a training job, to set a state moto never reaches by itself."""
    from moto.backends import get_backend

    return get_backend("sagemaker")["123456789012"]["us-east-1"].training_jobs[name]


# ---------------------------------------------------------------- bad input


def no_annotations(tmp_path: Path) -> Path:
    folder = tmp_path / "empty"
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "a.jpg").write_bytes(b"not looked at")
    return folder


BAD_INPUT = {
    "no role": (lambda d: ["train", "--data", str(d), "--bucket", BUCKET], "no execution role"),
    # A role NAME is resolved with IAM GetRole (tests/test_launch_lifecycle.py); moto has none.
    "role neither an ARN nor a name": (lambda d: train_args(d) + ["--role", "arn:aws:iam::12:role/x"],
                                       "is neither an IAM role ARN"),
    "unknown role name": (lambda d: train_args(d) + ["--role", "SageMakerRole"],
                          "there is no IAM role named SageMakerRole"),
    "missing bucket": (lambda d: train_args(d) + ["--bucket", "no-such-bucket-here"],
                       "the bucket 'no-such-bucket-here' does not exist"),
    "image not in ECR": (lambda d: train_args(d, "--image", "docker.io/me/sm-effdet:1"),
                         "is not an ECR image URI"),
    "bad hyperparameter": (lambda d: train_args(d, "--set", "img_size=300"), "img_size"),
    "unknown hyperparameter": (lambda d: train_args(d, "--set", "epoch=3"), "did you mean 'epochs'"),
    "MaxWait below MaxRuntime": (lambda d: train_args(d, "--max-run", "7200", "--max-wait", "3600"),
                                 "MaxWaitTimeInSeconds (3600) is below MaxRuntimeInSeconds (7200)"),
    "unknown instance type": (lambda d: train_args(d, "--instance-type", "ml.bogus.xlarge"),
                              "ml.bogus.xlarge"),
    "isolation without pretrained weights": (lambda d: train_args(d, "--network-isolation"),
                                             "pass --pretrained"),
    "job name with an underscore": (lambda d: train_args(d, "--name", "my_job"), "my_job"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_emulated_bad_input_is_one_sentence_exit_2_and_nothing_is_created(case, clients, shapes):
    make_args, words = BAD_INPUT[case]
    done = sm_effdet(*make_args(shapes))
    assert done.returncode == 2, done.stderr
    assert words in done.stderr
    assert done.stderr.startswith("sm-effdet: ") and done.stderr.count("\n") == 1
    assert "Traceback" not in done.stderr
    assert objects(clients["s3"]) == {}
    assert clients["sagemaker"].list_training_jobs()["TrainingJobSummaries"] == []


def test_emulated_data_without_annotations_is_refused_before_upload(clients, tmp_path):
    done = sm_effdet(*train_args(no_annotations(tmp_path)))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("sm-effdet: ") and "annotation file" in done.stderr
    assert objects(clients["s3"]) == {}
    assert clients["sagemaker"].list_training_jobs()["TrainingJobSummaries"] == []


# ---------------------------------------------------------------- upload and create


def channel_uri(sagemaker, job: str) -> str:
    return sagemaker.describe_training_job(TrainingJobName=job)["InputDataConfig"][0][
        "DataSource"]["S3DataSource"]["S3Uri"]


def test_emulated_upload_skips_what_is_there_and_the_job_gets_the_request(clients, shapes, tmp_path):
    data = tmp_path / "shapes"
    make_shapes_dataset(data, n_images=8)
    first = sm_effdet(*train_args(data, "--name", "job-1"))
    assert first.returncode == 0, first.stderr
    local = {p.relative_to(data).as_posix(): p.stat().st_size for p in data.rglob("*") if p.is_file()}
    uri = channel_uri(clients["sagemaker"], "job-1")
    # The prefix names the folder and its content (tests/test_launch_checks.py: what it holds).
    assert uri.startswith(f"s3://{BUCKET}/sm-effdet/datasets/shapes-") and uri.endswith("/")
    prefix = uri[len("s3://"):]
    assert objects(clients["s3"]) == {prefix + k: v for k, v in local.items()}
    assert f"{len(local)} files uploaded" in first.stdout
    assert "8 images" in first.stdout  # the data reader's summary
    assert "upload shapes [" in first.stderr  # the progress bar, in bytes
    assert f"{sum(local.values()) / 1000:.1f} KB" in first.stderr

    second = sm_effdet(*train_args(data, "--name", "job-2"))
    assert second.returncode == 0, second.stderr
    assert f"0 files uploaded (0 B), {len(local)} already there" in second.stdout
    assert channel_uri(clients["sagemaker"], "job-2") == uri

    # A changed folder is a new dataset: a prefix of its own, its unchanged files copied within
    # S3 from the earlier one, only the new file uploaded; the earlier prefix stays as it was.
    (data / "notes.txt").write_text("aaaa")
    third = sm_effdet(*train_args(data, "--name", "job-3"))
    assert f"1 files uploaded (4 B), {len(local)} copied within S3" in third.stdout, third.stdout
    assert channel_uri(clients["sagemaker"], "job-3") != uri
    # Same size, other bytes: the checksum catches it, and only that file goes up again.
    (data / "notes.txt").write_text("bbbb")
    fourth = sm_effdet(*train_args(data, "--name", "job-4"))
    assert f"1 files uploaded (4 B), {len(local)} copied within S3" in fourth.stdout, fourth.stdout
    held = {k: v for k, v in objects(clients["s3"]).items() if k.startswith(prefix)}
    assert held == {prefix + k: v for k, v in local.items()}

    sent = clients["sagemaker"].describe_training_job(TrainingJobName="job-2")
    assert sent["RoleArn"] == ROLE
    assert sent["HyperParameters"] == {"epochs": "1"}
    assert sent["CheckpointConfig"]["S3Uri"] == f"s3://{BUCKET}/sm-effdet/checkpoints/job-2"
    assert sent["EnableManagedSpotTraining"] is True


def test_emulated_s3_uris_are_used_as_they_are_and_train_follows_to_the_end(clients, shapes):
    done = sm_effdet("train", "--data", "s3://elsewhere/data/", "--role", ROLE, "--bucket",
                     BUCKET, "--no-spot", "--name", "job-s3", "--poll", "0.2")
    assert done.returncode == 0, done.stderr
    # Without --no-wait, train follows the job to its summary (moto ends it at once).
    assert done.stdout.splitlines()[-3:] == [
        f"model: s3://{BUCKET}/sm-effdet/jobs/job-s3/output/model.tar.gz",
        f"output: s3://{BUCKET}/sm-effdet/jobs/job-s3/output/output.tar.gz",
        "console: https://us-east-1.console.aws.amazon.com/sagemaker/home?region=us-east-1#/jobs/job-s3",
    ]
    sent = clients["sagemaker"].describe_training_job(TrainingJobName="job-s3")
    assert sent["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"] == "s3://elsewhere/data/"
    assert objects(clients["s3"]) == {}


# ---------------------------------------------------------------- following


def put_logs(logs, stream: str, lines: list[tuple[int, str]]) -> None:
    try:
        logs.create_log_stream(logGroupName=LOG_GROUP, logStreamName=stream)
    except logs.exceptions.ResourceAlreadyExistsException:
        pass
    logs.put_log_events(logGroupName=LOG_GROUP, logStreamName=stream,
                        logEvents=[{"timestamp": t, "message": m} for t, m in lines])


def running_job(clients, shapes, name: str):
    done = sm_effdet(*train_args(shapes, "--name", name))
    assert done.returncode == 0, done.stderr
    job = moto_job(name)
    # moto completes a job at once; a real one is InProgress for its whole run.
    job.training_job_status = "InProgress"
    job.secondary_status = "Training"
    return job


def wait_for(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


class Reader:
    """A process's stdout, line by line, in a thread."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(process.stdout,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))


def test_emulated_follow_merges_every_hosts_logs_by_time_until_the_end(clients, shapes):
    job = running_job(clients, shapes, "job-follow")
    logs = clients["logs"]
    logs.create_log_group(logGroupName=LOG_GROUP)
    base = int(time.time() * 1000)
    put_logs(logs, "job-follow/algo-1-1764748800", [(base, "a first"), (base + 20, "a third")])
    put_logs(logs, "job-follow/algo-2-1764748800", [(base + 10, "b second")])
    put_logs(logs, "other-job/algo-1-1764748800", [(base + 5, "not this job")])

    process = subprocess.Popen([sys.executable, str(SM_EFFDET), "logs", "job-follow", "--poll", "0.2"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reader = Reader(process)
    wait_for(lambda: "[algo-1] a third" in reader.lines)
    put_logs(logs, "job-follow/algo-2-1764748800", [(base + 30, "b fourth")])
    put_logs(logs, "job-follow/algo-1-1764748800", [(base + 40, "a fifth")])
    wait_for(lambda: "[algo-1] a fifth" in reader.lines)
    # A spot interruption: SageMaker's transitions, then a new stream per host for the new attempt.
    for status, message in (("Interrupted", "Training job interrupted: spot capacity reclaimed"),
                            ("Restarting", "Restarting the training job after an interruption")):
        job.secondary_status_transitions.append(
            {"Status": status, "StartTime": job.creation_time, "StatusMessage": message})
    wait_for(lambda: any("Restarting: " in line for line in reader.lines))
    put_logs(logs, "job-follow/algo-1-1764752400", [(base + 50, "a resumed from checkpoint")])
    wait_for(lambda: "[algo-1] a resumed from checkpoint" in reader.lines)
    job.secondary_status_transitions.append(
        {"Status": "Uploading", "StartTime": job.creation_time,
         "StatusMessage": "Uploading generated training model"})
    # What SageMaker reports at the end (moto would make these up; the test sets them).
    job.final_metric_data_list = [{"MetricName": "validation:mAP", "Value": 0.5,
                                   "Timestamp": job.creation_time}]
    job.training_time_in_seconds, job.billable_time_in_seconds = 1000, 300
    job.training_job_status = "Completed"
    assert process.wait(timeout=30) == 0, process.stderr.read()
    reader.thread.join(timeout=10)
    tagged = [line for line in reader.lines if line.startswith("[")]
    assert tagged == ["[algo-1] a first", "[algo-2] b second", "[algo-1] a third",
                      "[algo-2] b fourth", "[algo-1] a fifth", "[algo-1] a resumed from checkpoint"]
    text = "\n".join(reader.lines)
    assert "Starting: Preparing the instances for training" in text
    assert "Interrupted: Training job interrupted: spot capacity reclaimed" in text
    assert "Uploading: Uploading generated training model" in text
    assert "final metrics: validation:mAP=0.5" in text
    assert "training time: 1000 s, billable: 300 s (spot savings 70%)" in text
    assert "training job job-follow: Completed" in text
    assert f"model: s3://{BUCKET}/sm-effdet/jobs/job-follow/output/model.tar.gz" in text
    assert f"output: s3://{BUCKET}/sm-effdet/jobs/job-follow/output/output.tar.gz" in text
    assert "console: https://us-east-1.console.aws.amazon.com/sagemaker/home?region=us-east-1#/jobs/job-follow" in text


def test_emulated_a_failed_job_exits_1_with_its_failure_reason(clients, shapes):
    job = running_job(clients, shapes, "job-failed")
    job.training_job_status = "Failed"
    job.failure_reason = "AlgorithmError: no usable training image with boxes is left."
    done = sm_effdet("logs", "job-failed", "--poll", "0.2")
    assert done.returncode == 1
    assert done.stderr.strip() == ("sm-effdet: training job job-failed Failed: AlgorithmError: no "
                                   "usable training image with boxes is left.")


def test_emulated_ctrl_c_stops_following_not_the_job(clients, shapes):
    running_job(clients, shapes, "job-sigint")
    process = subprocess.Popen([sys.executable, str(SM_EFFDET), "logs", "job-sigint", "--poll", "0.2"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=sigint_as_a_terminal_sends_it)
    reader = Reader(process)
    wait_for(lambda: any("Starting" in line for line in reader.lines))
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 130
    err = process.stderr.read()
    assert "stopped following job-sigint; the job goes on" in err
    assert "sm-effdet logs job-sigint" in err and "sm-effdet stop job-sigint" in err
    assert "Traceback" not in err
    status = clients["sagemaker"].describe_training_job(TrainingJobName="job-sigint")
    assert status["TrainingJobStatus"] == "InProgress"


# ---------------------------------------------------------------- fetch and stop


def tar_gz(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_emulated_fetch_downloads_and_extracts_both_archives(clients, shapes, tmp_path):
    assert sm_effdet(*train_args(shapes, "--name", "job-fetch")).returncode == 0
    card = {"best_epoch": 7, "metrics": {"valid_map": 0.4321, "valid_map_50": 0.75}}
    where = "sm-effdet/jobs/job-fetch/output"
    # What a real job leaves at its output path (moto writes nothing there).
    clients["s3"].put_object(Bucket=BUCKET, Key=f"{where}/model.tar.gz", Body=tar_gz(
        {"model.json": json.dumps(card).encode(), "model.safetensors": b"weights"}))
    clients["s3"].put_object(Bucket=BUCKET, Key=f"{where}/output.tar.gz", Body=tar_gz(
        {"report/index.html": b"<html></html>", "data_report.json": b"{}"}))
    done = sm_effdet("fetch", "job-fetch", str(tmp_path / "got"))
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "got" / "model" / "model.json").read_text()) == card
    assert (tmp_path / "got" / "model" / "model.safetensors").read_bytes() == b"weights"
    report = tmp_path / "got" / "output" / "report" / "index.html"
    assert report.read_text() == "<html></html>"
    assert "best epoch 7: valid_map=0.4321 valid_map_50=0.75" in done.stdout
    assert f"report: {report.resolve()}" in done.stdout


def test_emulated_fetch_refuses_an_archive_that_escapes_its_folder(clients, shapes, tmp_path):
    assert sm_effdet(*train_args(shapes, "--name", "job-evil")).returncode == 0
    clients["s3"].put_object(Bucket=BUCKET, Key="sm-effdet/jobs/job-evil/output/model.tar.gz",
                             Body=tar_gz({"../../escaped.txt": b"x"}))
    done = sm_effdet("fetch", "job-evil", str(tmp_path / "got"))
    assert done.returncode != 0 and not (tmp_path / "escaped.txt").exists()


def test_emulated_stop_of_an_ended_job_and_of_an_unknown_one(clients, shapes):
    assert sm_effdet(*train_args(shapes, "--name", "job-stop")).returncode == 0
    done = sm_effdet("stop", "job-stop")
    assert done.returncode == 0
    assert "training job job-stop is already Completed; nothing to stop." in done.stdout
    unknown = sm_effdet("stop", "no-such-job")
    assert unknown.returncode == 1 and unknown.stderr.count("\n") == 1
    assert "Could not find training job" in unknown.stderr and "no-such-job" in unknown.stderr


def test_emulated_a_stopped_job_exits_1_naming_its_checkpoints(clients, shapes):
    job = running_job(clients, shapes, "job-stopped")
    job.training_job_status = "Stopped"
    done = sm_effdet("logs", "job-stopped", "--poll", "0.2")
    assert done.returncode == 1
    # No checkpoint was written to S3 (test_launch_jobs.py covers the one that was).
    assert done.stderr.strip() == (
        "sm-effdet: training job job-stopped Stopped: it was stopped before it finished; it left "
        f"no checkpoint in s3://{BUCKET}/sm-effdet/checkpoints/job-stopped/, so a new job would "
        "start from the beginning.")
