"""`--local` (sm_effdet.launch.local.run_local): a CreateTrainingJob request run on this machine.

Emulated: S3 is moto's server on 127.0.0.1 (the `aws` fixture), real enough for uploads,
listings and downloads; no SageMaker API is called. Real: the request dicts (checked with
botocore's model through check_request), the /opt/ml tree, the ./train process (one tiny real
training for the whole loop, the others stop before training), the archives, the ./serve
process answering over HTTP on 127.0.0.1, and the signals.
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import FAST, REPO
from test_serve import Server

from sm_effdet.demo import make_shapes_dataset
from sm_effdet.errors import UserInputError
from sm_effdet.launch.local import check_local_request, docker_command, run_local
from sm_effdet.launch.local_transfer import download_manifest, download_prefix
from sm_effdet.launch.local_tree import LocalJob, job_environment, write_config_files
from sm_effdet.launch.validation import check_request

BUCKET = "sm-effdet-local-test"
# Only train's environment: on the CPU, and any download attempt fails fast (as offline).
TRAIN_ENV = {
    "CUDA_VISIBLE_DEVICES": "",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "HTTP_PROXY": "http://127.0.0.1:9",
}


def training_request(name: str, training_uri: str, output_uri: str, **extra) -> dict:
    """A CreateTrainingJob request in AWS's exact shape, as the launcher builds one."""
    request = {
        "TrainingJobName": name,
        "RoleArn": "arn:aws:iam::123456789012:role/SageMakerRole",
        "AlgorithmSpecification": {
            "TrainingImage": "123456789012.dkr.ecr.us-east-1.amazonaws.com/sm-effdet:latest",
            "TrainingInputMode": "File",
        },
        "HyperParameters": {**FAST, "val_fraction": "0.25"},
        "InputDataConfig": [channel("training", training_uri)],
        "OutputDataConfig": {"S3OutputPath": output_uri},
        "ResourceConfig": {"InstanceType": "ml.m5.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 30},
        "StoppingCondition": {"MaxRuntimeInSeconds": 3600},
        "Environment": dict(TRAIN_ENV),
    }
    request.update(extra)
    return request


def channel(name: str, uri: str, **extra) -> dict:
    return {
        "ChannelName": name,
        "DataSource": {"S3DataSource": {
            "S3DataType": "S3Prefix", "S3Uri": uri, "S3DataDistributionType": "FullyReplicated",
        }},
        **extra,
    }


def upload(s3, folder: Path, prefix: str) -> None:
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        s3.upload_file(str(path), BUCKET, prefix + path.relative_to(folder).as_posix())


def keys(s3, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def archive_names(path: Path) -> list[str]:
    with tarfile.open(path) as archive:
        return sorted(archive.getnames())


@pytest.fixture
def s3(aws):
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    return client


# --- the whole loop, for real ------------------------------------------------------------------


def test_emulated_whole_loop_s3_data_real_train_archives_on_s3_then_serve_answers(s3, tmp_path):
    """Data on (emulated) S3, a real ./train, model.tar.gz and output.tar.gz at the real job's
    S3 paths, then the real ./serve on that model.tar.gz answering an image over HTTP."""
    make_shapes_dataset(tmp_path / "shapes", n_images=16)
    upload(s3, tmp_path / "shapes", "shapes/data/training/")
    # A second channel from a local folder (file://), as `--local` passes local data.
    make_shapes_dataset(tmp_path / "holdout", n_images=6, seed=1, first_id=10_000)
    name = "sm-effdet-local-loop"
    request = training_request(
        name, f"s3://{BUCKET}/shapes/data/training/", f"s3://{BUCKET}/shapes/jobs",
        CheckpointConfig={"S3Uri": f"s3://{BUCKET}/shapes/checkpoints/{name}"},
        TensorBoardOutputConfig={"S3OutputPath": f"s3://{BUCKET}/shapes/tensorboard"},
    )
    request["InputDataConfig"][0]["ContentType"] = "application/x-image"
    request["InputDataConfig"].append(
        channel("validation", (tmp_path / "holdout").as_uri(), InputMode="FastFile")
    )
    check_local_request(request)
    # A file the checkpoint location holds already is synced down before train starts.
    s3.put_object(Bucket=BUCKET, Key=f"shapes/checkpoints/{name}/notes.txt", Body=b"kept")

    out = io.StringIO()
    code = run_local(request, s3=s3, work_dir=tmp_path / "work", out=out)
    log = out.getvalue()
    assert code == 0, log[-4000:]
    tree = tmp_path / "work" / name

    # train's own lines were streamed to `out`, and the summary came last.
    assert re.search(r"epoch=1/1 train_loss=\S+ valid_loss=\S+ valid_map=", log), log[-3000:]
    assert "channel training: 17 objects from s3://" in log  # 16 images and annotations.json
    summary = log[log.rindex(f"local job {name}: Completed"):]
    assert "best epoch 1: valid_map=" in summary and f"report: {tree}/output/data/report/index.html" in summary
    output_uri = f"s3://{BUCKET}/shapes/jobs/{name}/output"
    assert f"model:  {output_uri}/model.tar.gz" in summary
    assert f"output: {output_uri}/output.tar.gz" in summary
    assert f"tree:   {tree}" in summary

    # The config files as SageMaker writes them: every hyperparameter a string.
    config = tree / "input" / "config"
    assert json.loads((config / "hyperparameters.json").read_text()) == request["HyperParameters"]
    assert json.loads((config / "inputdataconfig.json").read_text()) == {
        "training": {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated",
                     "RecordWrapperType": "None", "ContentType": "application/x-image"},
        "validation": {"TrainingInputMode": "FastFile", "S3DistributionType": "FullyReplicated",
                       "RecordWrapperType": "None"},
    }
    assert json.loads((config / "checkpointconfig.json").read_text()) == {
        "LocalPath": str(tree / "checkpoints"), "S3Uri": request["CheckpointConfig"]["S3Uri"],
    }
    # The local channel was linked, not copied, and train read both channels.
    assert (tree / "input" / "data" / "validation").resolve() == (tmp_path / "holdout").resolve()
    report = json.loads((tree / "output" / "data" / "data_report.json").read_text())
    assert set(report["channels"]) == {"training", "validation"}, report["channels"]

    # The archives, where DescribeTrainingJob's ModelArtifacts would point.
    prefix = f"shapes/jobs/{name}/output/"
    assert keys(s3, prefix) == [prefix + "model.tar.gz", prefix + "output.tar.gz"]
    s3.download_file(BUCKET, prefix + "model.tar.gz", str(tmp_path / "model.tar.gz"))
    s3.download_file(BUCKET, prefix + "output.tar.gz", str(tmp_path / "output.tar.gz"))
    model_names = archive_names(tmp_path / "model.tar.gz")
    assert {"model.json", "model.safetensors", "inference.py"} <= set(model_names), model_names
    output_names = archive_names(tmp_path / "output.tar.gz")
    assert "data_report.json" in output_names and "report/index.html" in output_names
    assert "failure" not in output_names

    # Checkpoints synced both ways; TensorBoard events below the configured path.
    checkpoints = keys(s3, f"shapes/checkpoints/{name}/")
    assert (tree / "checkpoints" / "notes.txt").read_text() == "kept"
    assert f"shapes/checkpoints/{name}/notes.txt" in checkpoints
    assert any(key.endswith(".ckpt") for key in checkpoints), checkpoints
    events = keys(s3, f"shapes/tensorboard/{name}/tensorboard-output/")
    assert any("events.out.tfevents" in key for key in events), events

    # A second job with the same checkpoint location resumes, as a restarted spot job would:
    # asked for 2 epochs, it trains only the second.
    second = copy.deepcopy(request)
    second["TrainingJobName"] = f"{name}-2"
    second["HyperParameters"]["epochs"] = "2"
    out = io.StringIO()
    code = run_local(second, s3=s3, work_dir=tmp_path / "work", out=out)
    log = out.getvalue()
    assert code == 0, log[-4000:]
    assert f"checkpoints: {len(checkpoints)} files from s3://{BUCKET}/shapes/checkpoints/{name}" in log
    assert "resuming from checkpoint" in log and "epoch=2/2 " in log and "epoch=1/2 " not in log, log[-4000:]
    assert f"shapes/jobs/{name}-2/output/model.tar.gz" in keys(s3, f"shapes/jobs/{name}-2/")

    # serve, from the model.tar.gz a deployment would get.
    serve_base = tmp_path / "serve_opt_ml"
    (serve_base / "model").mkdir(parents=True)
    with tarfile.open(tmp_path / "model.tar.gz") as archive:
        archive.extractall(serve_base / "model", filter="data")
    server = Server(serve_base, tmp_path / "serve.log")
    try:
        image = min((tmp_path / "shapes" / "images").glob("*.jpg")).read_bytes()
        response = server.post(image, **{"X-Amzn-SageMaker-Custom-Attributes": "score_threshold=0"})
        assert response.status_code == 200, response.text
        (prediction,) = response.json()["predictions"]
        assert prediction["detections"], prediction
        assert {d["class_name"] for d in prediction["detections"]} <= {"rectangle", "ellipse", "triangle"}
    finally:
        server.stop()


# --- a failing job -----------------------------------------------------------------------------


def test_emulated_bad_hyperparameter_exits_2_with_output_archive_and_no_model(s3, tmp_path):
    make_shapes_dataset(tmp_path / "shapes", n_images=4)
    upload(s3, tmp_path / "shapes", "bad/training/")
    request = training_request("sm-effdet-local-bad", f"s3://{BUCKET}/bad/training/", f"s3://{BUCKET}/bad/jobs")
    request["HyperParameters"]["epochs"] = "many"
    check_request("CreateTrainingJob", request)  # valid for SageMaker: the job refuses it

    out = io.StringIO()
    code = run_local(request, s3=s3, work_dir=tmp_path / "work", out=out)
    log = out.getvalue()
    assert code == 2, log[-3000:]
    prefix = "bad/jobs/sm-effdet-local-bad/output/"
    assert keys(s3, prefix) == [prefix + "output.tar.gz"]
    s3.download_file(BUCKET, prefix + "output.tar.gz", str(tmp_path / "output.tar.gz"))
    with tarfile.open(tmp_path / "output.tar.gz") as archive:
        reason = archive.extractfile("failure").read().decode()
    assert "epochs" in reason and "many" in reason, reason
    assert "local job sm-effdet-local-bad: Failed (train exited 2)" in log
    assert f"failure reason: {reason.strip().splitlines()[0]}" in log
    assert "model:  (none: the job did not complete)" in log


# --- signals, file:// channels and output ------------------------------------------------------


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_is_passed_on_to_train_and_the_stop_reaches_a_file_output_path(tmp_path, signum, code):
    """run_local in its own process with file:// channels and output: a SIGTERM (StopTrainingJob)
    or SIGINT (Ctrl-C) sent to it stops train, paused while reading image headers before any
    training, and the failure still arrives in output.tar.gz at the file:// output path."""
    name = signal.Signals(signum).name
    make_shapes_dataset(tmp_path / "shapes", n_images=4)
    coco = json.loads((tmp_path / "shapes" / "annotations.json").read_text())
    for entry in coco["images"]:  # sizes must come from the images' headers: a pause point
        del entry["width"], entry["height"]
    (tmp_path / "shapes" / "annotations.json").write_text(json.dumps(coco))
    request = training_request(
        "sm-effdet-local-stop", (tmp_path / "shapes").as_uri(), (tmp_path / "jobs").as_uri()
    )
    request["Environment"]["SM_EFFDET_TEST_PAUSE"] = "image-header"
    (tmp_path / "request.json").write_text(json.dumps(request))
    script = (
        "import json, sys; from pathlib import Path; from sm_effdet.launch.local import run_local; "
        f"sys.exit(run_local(json.loads(Path({str(tmp_path / 'request.json')!r}).read_text()), "
        f"work_dir=Path({str(tmp_path / 'work')!r})))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )
    lines = []
    for line in iter(process.stdout.readline, ""):
        lines.append(line)
        if "test pause at image-header" in line:
            break
    assert lines and "test pause at image-header" in lines[-1], "".join(lines[-30:])
    process.send_signal(signum)
    rest, _ = process.communicate(timeout=300)
    log = "".join(lines) + rest
    assert process.returncode == code, log[-3000:]
    assert f"local mode: passing {name} on to train" in log
    assert f"local job sm-effdet-local-stop: Stopped (train exited {code})" in log
    output = tmp_path / "jobs" / "sm-effdet-local-stop" / "output"
    assert sorted(p.name for p in output.iterdir()) == ["output.tar.gz"]
    with tarfile.open(output / "output.tar.gz") as archive:
        reason = archive.extractfile("failure").read().decode()
    assert reason.startswith(f"the job was stopped by {name}"), reason
    assert "before training began" in reason, reason
    # The channel was a link to the user's folder, which the job read and left as it was.
    tree = tmp_path / "work" / "sm-effdet-local-stop"
    assert (tree / "input" / "data" / "training").is_symlink()
    assert sorted(p.name for p in (tmp_path / "shapes").iterdir()) == ["annotations.json", "images"]


# --- what is checked before anything runs ------------------------------------------------------


@pytest.mark.parametrize("change, sentence", [
    (lambda r: r["ResourceConfig"].update(InstanceCount=2),
     r"^local mode runs one host, but the request asks for 2 instances; set the instance count to 1"),
    (lambda r: r["AlgorithmSpecification"].update(TrainingInputMode="Pipe"),
     r"^channel 'training' uses Pipe input mode, which cannot deliver image folders"),
    (lambda r: r.update(CheckpointConfig={"S3Uri": "s3://b/c", "LocalPath": "/checkpoints"}),
     r"^CheckpointConfig.LocalPath is /checkpoints, outside /opt/ml"),
    (lambda r: r["InputDataConfig"][0]["DataSource"]["S3DataSource"].update(S3Uri="https://b.s3.amazonaws.com/x"),
     r"^channel 'training' is an https:// URL"),
    (lambda r: r.update(TrainingJobName="bad_name"),
     r"^the CreateTrainingJob request is not valid: .*TrainingJobName"),
    (lambda r: r["AlgorithmSpecification"].update(TrainingInputMode="Bogus"),
     r"^the CreateTrainingJob request is not valid: .*TrainingInputMode is 'Bogus'"),
])
def test_requests_local_mode_cannot_honour_are_refused_before_anything_is_written(tmp_path, change, sentence):
    request = training_request("sm-effdet-local-refused", (tmp_path / "data").as_uri(), (tmp_path / "jobs").as_uri())
    change(request)
    with pytest.raises(UserInputError, match=sentence) as caught:
        run_local(copy.deepcopy(request), work_dir=tmp_path / "work")
    assert len(str(caught.value)) <= 1024 and "\n" not in str(caught.value)
    assert not (tmp_path / "work").exists() and not (tmp_path / "jobs").exists()


def test_missing_local_channel_is_one_sentence(tmp_path):
    request = training_request("sm-effdet-local-missing", (tmp_path / "nowhere").as_uri(), (tmp_path / "jobs").as_uri())
    with pytest.raises(UserInputError, match=r"^channel 'training' points to .*nowhere, which does not exist"):
        run_local(request, work_dir=tmp_path / "work", out=io.StringIO())
    assert not (tmp_path / "jobs").exists()


def test_emulated_empty_s3_channel_is_one_sentence(s3, tmp_path):
    request = training_request("sm-effdet-local-empty", f"s3://{BUCKET}/nothing/", f"s3://{BUCKET}/jobs")
    with pytest.raises(UserInputError, match=r"^channel 'training' has no objects under s3://sm-effdet-local-test/nothing/"):
        run_local(request, s3=s3, work_dir=tmp_path / "work", out=io.StringIO())
    assert keys(s3, "jobs/") == []


# --- the tree, the environment and the docker command, without running train -------------------


def test_config_files_and_environment_as_sagemaker_gives_them_in_the_image(tmp_path):
    request = training_request(
        "sm-effdet-local-config", "s3://b/data/training/", "s3://b/jobs",
        CheckpointConfig={"S3Uri": "s3://b/checkpoints/x"},
        Environment={"SERVE_BACKEND": "onnx"},
    )
    request["InputDataConfig"].append(channel("pretrained", "s3://b/weights/", InputMode="FastFile"))
    request["ResourceConfig"]["InstanceType"] = "ml.g5.xlarge"
    check_request("CreateTrainingJob", request)
    tree = tmp_path / "tree"
    (tree / "input" / "config").mkdir(parents=True)
    job = LocalJob(request, tree, image="example/sm-effdet:latest")
    write_config_files(job)
    config = tree / "input" / "config"
    assert sorted(p.name for p in config.iterdir()) == [
        "checkpointconfig.json", "hyperparameters.json", "inputdataconfig.json", "resourceconfig.json",
    ]
    hyperparameters = json.loads((config / "hyperparameters.json").read_text())
    assert hyperparameters == request["HyperParameters"]
    assert all(isinstance(v, str) for v in hyperparameters.values())
    assert json.loads((config / "resourceconfig.json").read_text()) == {
        "current_host": "algo-1",
        "current_instance_type": "ml.g5.xlarge",
        "current_group_name": "homogeneousCluster",
        "hosts": ["algo-1"],
        "instance_groups": [
            {"instance_group_name": "homogeneousCluster", "instance_type": "ml.g5.xlarge", "hosts": ["algo-1"]}
        ],
        "network_interface_name": "eth0",
    }
    assert json.loads((config / "inputdataconfig.json").read_text())["pretrained"] == {
        "TrainingInputMode": "FastFile", "S3DistributionType": "FullyReplicated", "RecordWrapperType": "None",
    }
    # In the image the paths are the container's own.
    assert json.loads((config / "checkpointconfig.json").read_text()) == {
        "LocalPath": "/opt/ml/checkpoints", "S3Uri": "s3://b/checkpoints/x",
    }
    env = job_environment(job)
    assert env["TRAINING_JOB_NAME"] == "sm-effdet-local-config"
    assert env["SERVE_BACKEND"] == "onnx"
    # The toolkit's SM_* variables are not the platform's: the image, without the toolkit,
    # never sees them on SageMaker, so the local run does not either.
    assert not [k for k in env if k.startswith("SM_")]
    assert "SAGEMAKER_BASE_DIR" not in env  # the image's /opt/ml is the default

    from_checkout = job_environment(LocalJob(request, tree, image=None))
    assert from_checkout["SAGEMAKER_BASE_DIR"] == str(tree)
    assert from_checkout["TRAINING_JOB_NAME"] == "sm-effdet-local-config"


def test_docker_command_is_built_as_sagemaker_starts_the_container(tmp_path):
    """Only the command line: no Docker engine here, so `docker run` itself is not run."""
    request = training_request("sm-effdet-local-docker", "s3://b/data/", "s3://b/jobs")
    job = LocalJob(request, tmp_path / "tree", image="example/sm-effdet:latest")
    job.mounts.append((tmp_path / "holdout", "/opt/ml/input/data/validation"))
    env = job_environment(job)
    command = docker_command(job, env, gpus=True)
    assert command[:5] == ["docker", "run", "--rm", "--name", "sm-effdet-local-docker"]
    assert command[-2:] == ["example/sm-effdet:latest", "train"]
    assert "--shm-size=16g" in command
    assert command[command.index("--gpus") + 1] == "all"
    volumes = [command[i + 1] for i, part in enumerate(command) if part == "-v"]
    assert volumes == [f"{tmp_path / 'tree'}:/opt/ml", f"{tmp_path / 'holdout'}:/opt/ml/input/data/validation:ro"]
    # Values travel through docker's environment, never on the command line.
    passed = {command[i + 1] for i, part in enumerate(command) if part == "-e"}
    assert passed == set(env) and "TRAINING_JOB_NAME" in passed
    assert "--gpus" not in docker_command(job, env, gpus=False)
    request["EnableNetworkIsolation"] = True
    assert docker_command(job, env, gpus=False)[6:8] == ["--network", "none"]


def test_emulated_s3_prefix_and_manifest_download_as_sagemaker_lays_them_out(s3, tmp_path):
    for key in ("d/train/a.jpg", "d/train/sub/b.jpg", "d/train/", "d/train2/c.jpg", "d/other.txt"):
        s3.put_object(Bucket=BUCKET, Key=key, Body=b"x")
    # A prefix ending in '/' is a folder: the paths below it are kept.
    assert download_prefix(s3, f"s3://{BUCKET}/d/train/", tmp_path / "folder") == 2
    assert sorted(p.relative_to(tmp_path / "folder").as_posix() for p in (tmp_path / "folder").rglob("*.jpg")) == [
        "a.jpg", "sub/b.jpg"]
    # Any other prefix matches keys by their start, each kept below the prefix's folder.
    assert download_prefix(s3, f"s3://{BUCKET}/d/train", tmp_path / "start") == 3
    assert sorted(p.relative_to(tmp_path / "start").as_posix() for p in (tmp_path / "start").rglob("*.jpg")) == [
        "train/a.jpg", "train/sub/b.jpg", "train2/c.jpg"]
    manifest = [{"prefix": f"s3://{BUCKET}/d/"}, "train/a.jpg", "train2/c.jpg"]
    s3.put_object(Bucket=BUCKET, Key="m.manifest", Body=json.dumps(manifest).encode())
    assert download_manifest(s3, f"s3://{BUCKET}/m.manifest", tmp_path / "manifest") == 2
    assert (tmp_path / "manifest" / "train2" / "c.jpg").read_bytes() == b"x"
    s3.put_object(Bucket=BUCKET, Key="bad.manifest", Body=json.dumps(manifest + ["../../etc/x"]).encode())
    with pytest.raises(UserInputError, match=r"lists '../../etc/x', which is not a file below its prefix"):
        download_manifest(s3, f"s3://{BUCKET}/bad.manifest", tmp_path / "bad")


def test_local_mode_imports_neither_torch_nor_boto3():
    """The launcher stays light: torch runs only in train's own process, boto3 loads on use."""
    script = (
        "import sys, sm_effdet.launch.local; "
        "print(sorted(m for m in ('torch', 'boto3', 'sm_effdet.training.job') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
