"""The training job's commands round two (issue 26 items 8, 10, 18): an interrupted upload,
output folders that are files, resuming a stopped job (item 20, tuning after --no-wait, is in
test_launch_tune_status.py).

Tests named test_emulated_* run the real `sm-effdet` command against moto's server on
127.0.0.1 (the `aws` fixture). moto completes a training job at once and has no StopTrainingJob,
so where a test needs a Stopped or InProgress job it sets the state of moto's own record (its
server runs in this process) and says so; `stop` is tested with botocore's own Stubber, which
checks each request and response against SageMaker's service model. moto keeps no Environment
of a job: the resume tests that need one build the DescribeTrainingJob answer themselves.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import boto3
import pytest
from botocore.stub import Stubber
from conftest import push_image, sigint_as_a_terminal_sends_it

from sm_effdet.demo import make_shapes_dataset
from sm_effdet.launch.cli import build_parser, route

REPO = Path(__file__).resolve().parents[1]
SM_EFFDET = REPO / "sm-effdet"
ACCOUNT = "123456789012"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/SageMakerRole"
BUCKET = "sm-effdet-jobs-bucket"
IMAGE = f"{ACCOUNT}.dkr.ecr.us-east-1.amazonaws.com/sm-effdet:abc1234"


def sm_effdet(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SM_EFFDET), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)


def one_sentence(done: subprocess.CompletedProcess, code: int) -> str:
    assert done.returncode == code, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("sm-effdet: ") and done.stderr.count("\n") == 1, done.stderr
    return done.stderr


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data") / "shapes"
    make_shapes_dataset(folder, n_images=8, size=(64, 48))
    return folder


@pytest.fixture
def clients(aws):
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    push_image(IMAGE)  # train checks in ECR that the image was pushed
    return {"s3": s3, "sagemaker": boto3.client("sagemaker")}


def keys(s3, prefix: str = "") -> dict[str, int]:
    found = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        found.update({item["Key"]: item["Size"] for item in page.get("Contents", [])})
    return found


def moto_job(name: str):
    """moto's own record of a training job, to set a state moto never reaches by itself."""
    from moto.backends import get_backend

    return get_backend("sagemaker")[ACCOUNT]["us-east-1"].training_jobs[name]


# ---------------------------------------------------------------- item 8: Ctrl-C during upload


def test_emulated_ctrl_c_during_upload_says_what_is_up_and_a_rerun_resumes(clients, tmp_path):
    # Many small files make the upload take seconds against the emulator: a real SIGINT to the
    # real command lands in the middle of it.
    data = tmp_path / "many"
    make_shapes_dataset(data, n_images=600, size=(64, 48))
    local = {p.relative_to(data).as_posix(): p.stat().st_size for p in data.rglob("*") if p.is_file()}
    # The folder's name, then its content's digest (tests/test_launch_checks.py).
    prefix = "sm-effdet/datasets/many-"
    command = [sys.executable, str(SM_EFFDET), "train", "--data", str(data), "--role", ROLE,
               "--bucket", BUCKET, "--image", IMAGE, "--name", "job-upload", "--no-wait"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=sigint_as_a_terminal_sends_it)
    deadline = time.monotonic() + 120
    while len(keys(clients["s3"], prefix)) < 20:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the upload never started"
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, out + err
    assert "Traceback" not in err and err.count("\n") == 1, err
    up = keys(clients["s3"], prefix)
    prefix = "/".join(next(iter(up)).split("/")[:3]) + "/"
    assert all(key.startswith(prefix) for key in up)
    assert 20 <= len(up) < len(local), "the interrupt came after the upload ended"
    assert err == (
        f"sm-effdet: interrupted during the upload of {data} to s3://{BUCKET}/{prefix}: "
        f"{len(up)} of {len(local)} files are there ({len(up)} uploaded now); run the same "
        f"command again to upload the other {len(local) - len(up)}: files already there with "
        "the same key, size and SHA-256 are skipped.\n")
    assert clients["sagemaker"].list_training_jobs()["TrainingJobSummaries"] == []
    # Every object that is there is whole: its bytes are the local file's.
    for key, size in up.items():
        assert size == local[key[len(prefix):]]

    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"{len(local) - len(up)} files uploaded" in again.stdout
    assert f"{len(up)} already there" in again.stdout
    assert keys(clients["s3"], prefix) == {prefix + k: v for k, v in local.items()}
    sent = clients["sagemaker"].describe_training_job(TrainingJobName="job-upload")
    assert sent["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"] == f"s3://{BUCKET}/{prefix}"


# ---------------------------------------------------------------- item 10: folders that are files


def test_emulated_fetch_into_a_file_is_refused_before_any_aws_call(clients, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    # The job does not exist: the folder is refused first, so nothing was asked of AWS.
    done = sm_effdet("fetch", "no-such-job", str(afile))
    assert f"the fetch folder {afile} is a file, not a folder" in one_sentence(done, 2)
    below = sm_effdet("fetch", "no-such-job", str(afile / "sub"))
    assert f"cannot be created because {afile} is a file" in one_sentence(below, 2)
    assert afile.read_text() == "keep me"


def test_emulated_fetch_into_a_folder_whose_model_is_a_file_is_refused(clients, shapes, tmp_path):
    assert sm_effdet("train", "--data", str(shapes), "--role", ROLE, "--bucket", BUCKET,
                     "--image", IMAGE, "--name", "job-fetched", "--no-wait").returncode == 0
    clients["s3"].put_object(Bucket=BUCKET, Key="sm-effdet/jobs/job-fetched/output/model.tar.gz",
                             Body=b"not downloaded")
    got = tmp_path / "got"
    got.mkdir()
    (got / "model").write_text("a file where fetch extracts the model")
    done = sm_effdet("fetch", "job-fetched", str(got))
    assert f"the fetch folder {got / 'model'} is a file" in one_sentence(done, 2)
    assert sorted(p.name for p in got.iterdir()) == ["model"]


def test_local_output_folder_that_is_a_file_is_refused_before_training(shapes, tmp_path, monkeypatch):
    # No AWS at all: --local without --bucket writes under ./sm-effdet-output.
    for key in ("AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    (tmp_path / "sm-effdet-output").write_text("not a folder")
    started = time.monotonic()
    done = sm_effdet("train", "--local", "--data", str(shapes), "--set", "epochs=1",
                     "--name", "job-local", cwd=tmp_path, timeout=300)
    sentence = one_sentence(done, 2)
    assert (f"the output folder {tmp_path / 'sm-effdet-output' / 'jobs' / 'job-local' / 'output'} "
            f"cannot be created because {tmp_path / 'sm-effdet-output'} is a file") in sentence
    assert "local job job-local: /opt/ml is" not in done.stdout  # no tree, no train
    assert time.monotonic() - started < 60


# ---------------------------------------------------------------- item 18: resume


def launch(shapes: Path, name: str, *extra: str) -> None:
    done = sm_effdet("train", "--data", str(shapes), "--validation", "s3://elsewhere/val/",
                     "--role", ROLE, "--bucket", BUCKET, "--image", IMAGE, "--name", name,
                     "--no-wait", *extra)
    assert done.returncode == 0, done.stderr


def put_checkpoint(s3, uri: str, host: str = "algo-1") -> str:
    key = uri[len(f"s3://{BUCKET}/"):].rstrip("/") + f"/checkpoint-{host}-epoch0002-step000000010.ckpt"
    s3.put_object(Bucket=BUCKET, Key=key, Body=b"a checkpoint")
    return key


def test_emulated_resume_from_a_stopped_job_reuses_its_checkpoints_and_settings(clients, shapes):
    sagemaker = clients["sagemaker"]
    launch(shapes, "job-old", "--instance-type", "ml.g5.2xlarge", "--max-run", "7200",
           "--set", "epochs=30", "--set", "batch_size=4", "--tag", "team=vision")
    old = sagemaker.describe_training_job(TrainingJobName="job-old")
    put_checkpoint(clients["s3"], old["CheckpointConfig"]["S3Uri"])
    moto_job("job-old").training_job_status = "Stopped"  # moto has no StopTrainingJob
    before = keys(clients["s3"])

    # --instance-type given with the default's value still overrides the old job's.
    done = sm_effdet("train", "--resume-from", "job-old", "--name", "job-new", "--no-wait",
                     "--set", "batch_size=8", "--instance-type", "ml.g5.xlarge")
    assert done.returncode == 0, done.stderr
    assert ("resuming training job job-old (Stopped) as job-new, from the 1 checkpoint file in "
            f"{old['CheckpointConfig']['S3Uri']}/") in done.stdout
    new = sagemaker.describe_training_job(TrainingJobName="job-new")
    assert new["CheckpointConfig"] == {**old["CheckpointConfig"],
                                       "S3Uri": old["CheckpointConfig"]["S3Uri"] + "/"}
    assert new["HyperParameters"] == {**old["HyperParameters"], "batch_size": "8"}
    assert new["InputDataConfig"] == old["InputDataConfig"]
    assert new["AlgorithmSpecification"]["TrainingImage"] == IMAGE
    assert new["RoleArn"] == ROLE
    assert new["ResourceConfig"] == {**old["ResourceConfig"], "InstanceType": "ml.g5.xlarge"}
    assert new["StoppingCondition"] == old["StoppingCondition"]
    assert new["OutputDataConfig"] == old["OutputDataConfig"]
    # (moto keeps no Environment: test_resume_fills_every_flag_not_given_from_the_old_job.)
    tags = sagemaker.list_tags(ResourceArn=new["TrainingJobArn"])["Tags"]
    assert {t["Key"]: t["Value"] for t in tags} == {"team": "vision"}
    assert keys(clients["s3"]) == before  # the data was not uploaded again


def test_emulated_resume_of_a_tuning_trial_uses_the_trials_own_checkpoints(clients, shapes):
    # A trial as SageMaker creates one: the tuning job's checkpoint folder for every trial,
    # _tuning_objective_metric among its hyperparameters (moto cannot run trials itself).
    request = json.loads(sm_effdet("train", "--data", "s3://elsewhere/train/", "--role", ROLE,
                                   "--bucket", BUCKET, "--image", IMAGE, "--name",
                                   "tune-1-001-abcd1234", "--dry-run").stdout)
    request["HyperParameters"]["_tuning_objective_metric"] = "validation:mAP"
    request["CheckpointConfig"]["S3Uri"] = f"s3://{BUCKET}/sm-effdet/checkpoints/tune-1/"
    clients["sagemaker"].create_training_job(**request)
    moto_job("tune-1-001-abcd1234").training_job_status = "Failed"
    trial_uri = f"s3://{BUCKET}/sm-effdet/checkpoints/tune-1/tune-1-001-abcd1234/"
    put_checkpoint(clients["s3"], trial_uri)
    done = sm_effdet("train", "--resume-from", "tune-1-001-abcd1234", "--name", "job-after",
                     "--dry-run")
    assert done.returncode == 0, done.stderr
    sent = json.loads(done.stdout)
    assert sent["CheckpointConfig"]["S3Uri"] == trial_uri
    assert "_tuning_objective_metric" not in sent["HyperParameters"]
    assert "from the 1 checkpoint file in " + trial_uri in done.stderr


def test_emulated_resume_is_refused_with_one_sentence_when_it_cannot_go_on(clients, shapes):
    sagemaker = clients["sagemaker"]
    launch(shapes, "job-done", "--set", "epochs=3")
    uri = sagemaker.describe_training_job(TrainingJobName="job-done")["CheckpointConfig"]["S3Uri"]

    nothing = sm_effdet("train", "--resume-from", "job-done", "--dry-run")
    assert f"left no checkpoint in {uri}/" in one_sentence(nothing, 2)

    put_checkpoint(clients["s3"], uri)
    done = sm_effdet("train", "--resume-from", "job-done", "--dry-run")  # moto: Completed
    assert "Completed its 3 epochs" in one_sentence(done, 2) and "--set epochs=N" in done.stderr
    longer = sm_effdet("train", "--resume-from", "job-done", "--set", "epochs=5", "--dry-run")
    assert longer.returncode == 0, longer.stderr
    assert json.loads(longer.stdout)["HyperParameters"]["epochs"] == "5"

    moto_job("job-done").training_job_status = "InProgress"
    running = sm_effdet("train", "--resume-from", "job-done", "--dry-run")
    assert "is still InProgress" in one_sentence(running, 2)
    assert "sm-effdet stop job-done" in running.stderr
    unknown = sm_effdet("train", "--resume-from", "no-such-job", "--dry-run")
    assert "there is no training job named no-such-job in region us-east-1" in one_sentence(unknown, 1)
    local = sm_effdet("train", "--resume-from", "job-done", "--local")
    assert "run it without --local" in one_sentence(local, 2)
    assert [j["TrainingJobName"] for j in sagemaker.list_training_jobs()["TrainingJobSummaries"]] == ["job-done"]


def test_emulated_a_stopped_job_is_named_with_the_command_that_resumes_it(clients, shapes):
    launch(shapes, "job-halted")
    uri = clients["sagemaker"].describe_training_job(TrainingJobName="job-halted")[
        "CheckpointConfig"]["S3Uri"]
    moto_job("job-halted").training_job_status = "Stopped"
    without = sm_effdet("logs", "job-halted", "--poll", "0.2")
    assert without.stderr == (
        "sm-effdet: training job job-halted Stopped: it was stopped before it finished; it left "
        f"no checkpoint in {uri}/, so a new job would start from the beginning.\n")
    put_checkpoint(clients["s3"], uri)
    done = sm_effdet("logs", "job-halted", "--poll", "0.2")
    assert done.returncode == 1
    assert done.stderr == (
        "sm-effdet: training job job-halted Stopped: it was stopped before it finished; its "
        f"checkpoints are in {uri}/: resume it with `sm-effdet train --resume-from job-halted`.\n")


def old_description() -> dict:
    """A DescribeTrainingJob answer with what moto does not keep (environment, VPC, a warm pool
    and volume key, a sharded channel with a content type)."""
    description = training_description("job-rich", "Stopped")
    description.update(
        RoleArn=ROLE, HyperParameters={"epochs": "20", "batch_size": "4", "pretrained": "true"},
        InputDataConfig=[
            {"ChannelName": "training", "ContentType": "application/x-image", "DataSource": {
                "S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": "s3://data/train/",
                                 "S3DataDistributionType": "ShardedByS3Key"}}},
            {"ChannelName": "pretrained", "DataSource": {"S3DataSource": {
                "S3DataType": "S3Prefix", "S3Uri": "s3://data/weights/",
                "S3DataDistributionType": "FullyReplicated"}}}],
        OutputDataConfig={"S3OutputPath": f"s3://{BUCKET}/team/jobs", "KmsKeyId": "alias/out"},
        # No warm pool: SageMaker takes none with spot (validation.py refuses the pair).
        ResourceConfig={"InstanceType": "ml.p3.2xlarge", "InstanceCount": 2, "VolumeSizeInGB": 80,
                        "VolumeKmsKeyId": "alias/vol"},
        StoppingCondition={"MaxRuntimeInSeconds": 7200, "MaxWaitTimeInSeconds": 9000},
        EnableManagedSpotTraining=True, EnableNetworkIsolation=True,
        VpcConfig={"Subnets": ["subnet-1"], "SecurityGroupIds": ["sg-1"]},
        Environment={"KEEP": "me", "OVER": "old"},
        CheckpointConfig={"S3Uri": f"s3://{BUCKET}/team/checkpoints/job-rich",
                          "LocalPath": "/opt/ml/checkpoints"},
    )
    return description


def resumed_request(monkeypatch, *flags: str) -> dict:
    from sm_effdet.launch import resume
    from sm_effdet.launch.jobs import add_train_arguments
    from sm_effdet.launch.request import prepare_training_request

    monkeypatch.setenv("AWS_REGION", "us-east-1")
    argv = route(["train", "--resume-from", "job-rich", "--name", "job-next", "--dry-run", *flags])
    args = build_parser().parse_args(argv)
    args.argv = argv
    old = resume.Resume(old_description(), [{"Key": "team", "Value": "vision"},
                                            {"Key": "aws:cloudformation:stack", "Value": "x"}], 1)
    old.fill(args, resume.given_flags(args, add_train_arguments))
    return old.apply(prepare_training_request(args, s3=None, out=io.StringIO()))


def test_resume_fills_every_flag_not_given_from_the_old_job(monkeypatch):
    old = old_description()
    sent = resumed_request(monkeypatch, "--env", "OVER=new", "--set", "epochs=25")
    assert sent["TrainingJobName"] == "job-next"
    assert sent["InputDataConfig"] == old["InputDataConfig"]
    assert sent["HyperParameters"] == {**old["HyperParameters"], "epochs": "25"}
    assert sent["ResourceConfig"] == old["ResourceConfig"]
    assert sent["StoppingCondition"] == old["StoppingCondition"]
    assert sent["EnableManagedSpotTraining"] is True and sent["EnableNetworkIsolation"] is True
    assert sent["VpcConfig"] == old["VpcConfig"]
    assert sent["OutputDataConfig"] == old["OutputDataConfig"]
    assert sent["CheckpointConfig"] == {**old["CheckpointConfig"],
                                        "S3Uri": old["CheckpointConfig"]["S3Uri"] + "/"}
    assert sent["Environment"] == {"KEEP": "me", "OVER": "new"}
    assert sent["Tags"] == [{"Key": "team", "Value": "vision"}]  # aws: tags cannot be set
    assert sent["AlgorithmSpecification"]["TrainingImage"] == IMAGE
    assert sent["RoleArn"] == ROLE
    # TensorBoard goes to the old job's bucket and prefix, under the new job's name.
    assert sent["TensorBoardOutputConfig"]["S3OutputPath"] == f"s3://{BUCKET}/team/tensorboard/job-next"


def test_resume_flags_given_win_and_a_new_max_run_gets_its_own_max_wait(monkeypatch):
    sent = resumed_request(monkeypatch, "--max-run", "3600", "--no-spot", "--data",
                           "s3://data/other/", "--instance-count", "1", "--subnet", "subnet-9",
                           "--security-group", "sg-9")
    assert sent["StoppingCondition"] == {"MaxRuntimeInSeconds": 3600}
    assert "EnableManagedSpotTraining" not in sent
    assert sent["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"] == "s3://data/other/"
    assert sent["InputDataConfig"][1] == old_description()["InputDataConfig"][1]
    assert sent["ResourceConfig"]["InstanceCount"] == 1
    assert sent["VpcConfig"] == {"Subnets": ["subnet-9"], "SecurityGroupIds": ["sg-9"]}


def sagemaker_stubbed():
    client = boto3.client("sagemaker", region_name="us-east-1", aws_access_key_id="x",
                          aws_secret_access_key="x")
    return client, Stubber(client)


NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def training_description(name: str, status: str) -> dict:
    return {
        "TrainingJobName": name, "TrainingJobArn": f"arn:aws:sagemaker:us-east-1:{ACCOUNT}:training-job/{name}",
        "TrainingJobStatus": status, "SecondaryStatus": "Training", "CreationTime": NOW,
        "AlgorithmSpecification": {"TrainingImage": IMAGE, "TrainingInputMode": "FastFile"},
        "ResourceConfig": {"InstanceType": "ml.g5.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 50},
        "StoppingCondition": {"MaxRuntimeInSeconds": 3600},
        "ModelArtifacts": {"S3ModelArtifacts": ""},
        "CheckpointConfig": {"S3Uri": f"s3://{BUCKET}/sm-effdet/checkpoints/{name}"},
    }


def test_stop_names_the_resume_command_stubbed():
    from sm_effdet.launch.jobs import stop

    client, stub = sagemaker_stubbed()
    stub.add_response("describe_training_job", training_description("job-run", "InProgress"),
                      {"TrainingJobName": "job-run"})
    stub.add_response("stop_training_job", {}, {"TrainingJobName": "job-run"})
    out = io.StringIO()
    with stub:
        stop("job-run", sagemaker=client, out=out)
        stub.assert_no_pending_responses()
    assert "resume it with `sm-effdet train --resume-from job-run`" in out.getvalue()
    assert f"s3://{BUCKET}/sm-effdet/checkpoints/job-run/" in out.getvalue()


def test_the_new_launcher_modules_import_no_torch():
    code = ("import sys; import sm_effdet.launch.cli, sm_effdet.launch.resume, "
            "sm_effdet.launch.tuning_status, sm_effdet.launch.folders, sm_effdet.launch.upload; "
            "from sm_effdet.launch.cli import build_parser; build_parser(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lightning')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              [str(REPO / "src"), os.environ.get("PYTHONPATH", "")])})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
