"""The request builder, offline: every request it builds passes botocore's SageMaker model and
the launcher's extra checks; `--dry-run` prints it with no credentials; no torch; fast --help.
No emulator and no AWS here: nothing is sent."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from botocore.validate import validate_parameters

from sm_effdet.errors import UserInputError
from sm_effdet.launch.request import (
    build_training_request,
    default_image,
    job_name,
    metric_definitions,
    read_hyperparameters,
)
from sm_effdet.launch.validation import check_request, service_model

REPO = Path(__file__).resolve().parents[1]
SM_EFFDET = REPO / "sm-effdet"
ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/sm-effdet:abc1234"
NAME_PATTERN = r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}"


def request(**overrides):
    kwargs = dict(
        name="sm-effdet-tf-lite0-20261203-080000", role=ROLE, image=IMAGE,
        channels={"training": "s3://bkt/sm-effdet/shapes/data/training/"},
        output_path="s3://bkt/sm-effdet/jobs", hyperparameters={"epochs": "2", "augment": "false"},
        checkpoint_uri="s3://bkt/sm-effdet/checkpoints/j", tensorboard_uri="s3://bkt/sm-effdet/tb/j",
    )
    kwargs.update(overrides)
    return build_training_request(**kwargs)


VARIANTS = {
    "spot": {},
    "on-demand": {"spot": False},
    "several instances": {"instance_count": 4, "instance_type": "ml.p4d.24xlarge"},
    "isolation": {
        "network_isolation": True,
        "channels": {"training": "s3://bkt/d/training/", "validation": "s3://bkt/d/validation/",
                     "pretrained": "s3://bkt/w/", "model": "s3://bkt/m/"},
    },
    "vpc, env, tags, File mode": {
        "subnets": ["subnet-0123456789abcdef0"], "security_groups": ["sg-0123456789abcdef0"],
        "environment": {"NCCL_DEBUG": "INFO"}, "tags": {"project": "detect"}, "input_mode": "File",
    },
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_request_passes_botocores_model_and_the_extra_checks(variant):
    params = request(**VARIANTS[variant])
    shape = service_model().operation_model("CreateTrainingJob").input_shape
    validate_parameters(params, shape)  # raises on any problem botocore knows
    check_request("CreateTrainingJob", params)
    stopping = params["StoppingCondition"]
    if params.get("EnableManagedSpotTraining"):
        assert stopping["MaxWaitTimeInSeconds"] >= stopping["MaxRuntimeInSeconds"]
        assert params["CheckpointConfig"]["S3Uri"].startswith("s3://")
    else:
        assert "MaxWaitTimeInSeconds" not in stopping
    assert all(isinstance(v, str) for v in params["HyperParameters"].values())
    assert params["AlgorithmSpecification"]["MetricDefinitions"] == json.loads(
        (REPO / "metric_definitions.json").read_text())
    assert params["TensorBoardOutputConfig"]["LocalPath"] == "/opt/ml/output/tensorboard"
    assert params["RetryStrategy"]["MaximumRetryAttempts"] >= 1


@pytest.mark.parametrize("overrides, words", [
    ({"max_run": 7200, "max_wait": 3600}, "MaxWaitTimeInSeconds (3600) is below"),
    ({"checkpoint_uri": None}, "without CheckpointConfig restarts from scratch"),
    ({"instance_type": "ml.bogus.xlarge"}, "ml.bogus.xlarge"),
    ({"name": "my_job"}, "my_job"),
    ({"spot": False, "max_wait": 3600}, "only for managed spot"),
])
def test_requests_sagemaker_would_refuse_are_refused_with_one_sentence(overrides, words):
    with pytest.raises(UserInputError) as caught:
        check_request("CreateTrainingJob", request(**overrides))
    assert words in str(caught.value)
    assert "\n" not in str(caught.value)


def test_hyperparameters_are_checked_by_the_jobs_parser_and_sent_as_strings(tmp_path):
    path = tmp_path / "hp.json"
    path.write_text(json.dumps({"epochs": 3, "augment": False, "learning_rate": 0.01,
                                "backbone": "tf_lite0"}))
    sent = read_hyperparameters(path, [("img_size", "384")])
    assert sent == {"epochs": "3", "augment": "false", "learning_rate": "0.01",
                    "backbone": "tf_lite0", "img_size": "384"}
    with pytest.raises(UserInputError, match="img_size"):
        read_hyperparameters(path, [("img_size", "300")])
    with pytest.raises(UserInputError, match="did you mean 'epochs'"):
        read_hyperparameters(None, [("epoch", "3")])


def test_job_names_and_the_default_image():
    assert re.fullmatch(NAME_PATTERN, job_name("tf_lite0"))
    long_name = job_name("models.ross.efficientdet.backbones." + "x" * 80)
    assert re.fullmatch(NAME_PATTERN, long_name) and long_name.startswith("sm-effdet-")
    assert default_image("123456789012", "eu-west-1", "v1") == (
        "123456789012.dkr.ecr.eu-west-1.amazonaws.com/sm-effdet:v1")
    assert default_image("123456789012", "cn-north-1", "v1").endswith(".amazonaws.com.cn/sm-effdet:v1")
    assert metric_definitions()[2]["Name"] == "validation:mAP"


def no_aws_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_REGION="eu-west-1", AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_EC2_METADATA_DISABLED="true")
    return env


def test_dry_run_prints_the_exact_request_with_no_credentials(tmp_path):
    from sm_effdet.demo import make_shapes_dataset

    data = tmp_path / "shapes"
    make_shapes_dataset(data, n_images=6)
    done = subprocess.run(
        [sys.executable, str(SM_EFFDET), "train", "--dry-run", "--data", str(data), "--role", ROLE,
         "--bucket", "my-bucket", "--set", "epochs=2", "--set", "augment=false",
         "--instance-count", "2", "--max-run", "3600", "--name", "dry-1"],
        capture_output=True, text=True, env=no_aws_env(tmp_path), timeout=120,
    )
    assert done.returncode == 0, done.stderr
    params = json.loads(done.stdout)  # stdout is the request alone
    check_request("CreateTrainingJob", params)
    assert params["TrainingJobName"] == "dry-1"
    assert params["AlgorithmSpecification"]["TrainingImage"].startswith(
        "123456789012.dkr.ecr.eu-west-1.amazonaws.com/sm-effdet:")
    assert params["AlgorithmSpecification"]["TrainingInputMode"] == "FastFile"
    assert params["HyperParameters"] == {"epochs": "2", "augment": "false"}
    # The folder's name and its content's digest (tests/test_launch_checks.py: what it holds).
    assert re.fullmatch(r"s3://my-bucket/sm-effdet/datasets/shapes-[0-9a-f]{12}/",
                        params["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"])
    assert params["ResourceConfig"]["InstanceCount"] == 2
    assert params["StoppingCondition"] == {"MaxRuntimeInSeconds": 3600, "MaxWaitTimeInSeconds": 7200}
    assert params["CheckpointConfig"]["S3Uri"] == "s3://my-bucket/sm-effdet/checkpoints/dry-1"
    assert "6 images" in done.stderr  # the data reader's summary, on stderr


def test_the_launcher_imports_no_torch():
    code = (
        "import sys, sm_effdet.launch.cli as c, sm_effdet.launch.request, sm_effdet.launch.jobs,"
        " sm_effdet.launch.follow, sm_effdet.launch.upload, sm_effdet.launch.aws,"
        " sm_effdet.data.formats, sm_effdet.hyperparameters; c.build_parser();"
        " print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lightning')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_help_answers_in_under_two_seconds():
    for args in (["--help"], ["train", "--help"]):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, str(SM_EFFDET), *args], capture_output=True,
                              text=True, timeout=30)
        elapsed = time.perf_counter() - start
        assert done.returncode == 0 and "usage: sm-effdet" in done.stdout
        assert elapsed < 2.0, f"sm-effdet {' '.join(args)} took {elapsed:.2f} s"
    assert "--no-spot" in done.stdout and "--set KEY=VALUE" in done.stdout
    script = Path(sys.executable).parent / "sm-effdet"  # [project.scripts], as uv run finds it
    if script.exists():
        done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0 and "usage: sm-effdet" in done.stdout


def test_local_mode_gets_file_uris_and_uploads_nothing(tmp_path, monkeypatch):
    from sm_effdet.demo import make_shapes_dataset
    from sm_effdet.launch.cli import build_parser
    from sm_effdet.launch.request import prepare_training_request

    data = tmp_path / "shapes"
    make_shapes_dataset(data, n_images=6)
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(
        ["train", "--local", "--data", str(data), "--validation", "s3://bkt/val/", "--name", "local-1",
         "--image", "sm-effdet:dev"])
    out = io.StringIO()
    params = prepare_training_request(args, s3=None, out=out)  # no client: nothing can be sent
    uris = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in params["InputDataConfig"]}
    assert uris == {"training": data.resolve().as_uri(), "validation": "s3://bkt/val/"}
    assert params["OutputDataConfig"]["S3OutputPath"] == (tmp_path / "sm-effdet-output" / "jobs").as_uri()
    assert params["CheckpointConfig"]["S3Uri"].startswith("file://")
    assert params["AlgorithmSpecification"]["TrainingImage"] == "sm-effdet:dev"  # built here, not in ECR
    assert "6 images" in out.getvalue()


def test_aws_errors_become_one_sentence_each():
    from botocore.exceptions import ClientError, NoCredentialsError

    from sm_effdet.launch.aws import explain

    def error(code: str, message: str) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": message}}, "CreateTrainingJob")

    cases = {
        error("AccessDeniedException", "User: x is not authorized to perform: sagemaker:CreateTrainingJob"):
            "AWS denied CreateTrainingJob",
        error("ResourceLimitExceeded", "The account-level service limit 'ml.p4d.24xlarge for spot "
              "training job usage' is 0 Instances"): "Service Quotas",
        error("ThrottlingException", "Rate exceeded"): "kept throttling CreateTrainingJob after 8 attempts",
        error("ValidationException", "Could not find training job 'x'"): "check the name and the region",
        NoCredentialsError(): "no AWS credentials were found",
    }
    for exc, words in cases.items():
        sentence = explain(exc)
        assert words in sentence and "\n" not in sentence and sentence.endswith(".")


def test_clients_use_botocores_standard_retry_mode(monkeypatch):
    from sm_effdet.launch.aws import MAX_ATTEMPTS, client

    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    sagemaker = client("sagemaker")
    assert sagemaker.meta.region_name == "eu-west-1"
    assert sagemaker.meta.config.retries == {"mode": "standard", "total_max_attempts": MAX_ATTEMPTS}


def test_no_credentials_is_one_sentence_and_exit_1(tmp_path):
    done = subprocess.run([sys.executable, str(SM_EFFDET), "logs", "some-job"], capture_output=True,
                          text=True, env=no_aws_env(tmp_path), timeout=60)
    assert done.returncode == 1
    assert done.stderr.startswith("sm-effdet: no AWS credentials were found") and done.stderr.count("\n") == 1


def test_augmented_manifests_are_pipe_channels_the_job_can_cache(tmp_path):
    """--augmented-manifest: the channel shape the built-in algorithm takes (and formats/pipe.py
    caches), checked against botocore's model; local paths and a wrong attribute order refused."""
    manifest = "s3://bkt/labels/output.manifest"
    args = [sys.executable, str(SM_EFFDET), "train", "--dry-run", "--data", manifest,
            "--validation", "s3://bkt/labels/validation.manifest", "--role", ROLE,
            "--bucket", "bkt", "--name", "pipe-1"]
    done = subprocess.run(args + ["--augmented-manifest", "source-ref,boxes,boxes-metadata"],
                          capture_output=True, text=True, env=no_aws_env(tmp_path), timeout=120)
    assert done.returncode == 0, done.stderr
    params = json.loads(done.stdout)
    check_request("CreateTrainingJob", params)
    training, validation = params["InputDataConfig"]
    for entry in (training, validation):
        assert entry["InputMode"] == "Pipe" and entry["RecordWrapperType"] == "RecordIO"
        source = entry["DataSource"]["S3DataSource"]
        assert source["S3DataType"] == "AugmentedManifestFile"
        assert source["AttributeNames"] == ["source-ref", "boxes", "boxes-metadata"]
    assert training["DataSource"]["S3DataSource"]["S3Uri"] == manifest
    assert params["HyperParameters"]["label_attribute"] == "boxes"

    for extra, words in (
        (["--augmented-manifest", "boxes,source-ref"], "must list source-ref first"),
        (["--augmented-manifest", "source-ref,boxes", "--validation", str(tmp_path)],
         "--validation must be the s3:// URI of the manifest"),
    ):
        done = subprocess.run(args + extra, capture_output=True, text=True,
                              env=no_aws_env(tmp_path), timeout=120)
        assert done.returncode == 2, done.stderr
        assert words in done.stderr and done.stdout == ""
        assert len(done.stderr.strip().splitlines()) == 1
