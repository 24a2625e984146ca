"""`sm-effdet tune`, `deploy` and `transform` (launch/tuning.py, deploy.py, transform.py and
hosting.py, what the last two share).

What is real and what is emulated:
- Every request is checked against botocore's own SageMaker service model (offline, real).
- Tests named `test_emulated_*` run against moto's server on 127.0.0.1 (the `aws` fixture).
  moto's S3 is faithful; its SageMaker is shallow: a training job is Completed at once, an
  endpoint is InService at once, InvokeEndpoint answers a made-up "body", a transform job is
  Completed at once and writes nothing, a tuning job is Completed at once with a made-up best
  trial; its InvokeEndpoint decodes the body as UTF-8 (a binary image makes it answer 500), so
  the emulated deploys send a --sample file of text bytes (the generated PNG is checked with
  Pillow instead). moto 5.2 has no UpdateEndpoint and no ListTrainingJobsForHyperParameterTuningJob (it
  answers 500), so updating an endpoint and following trials are not run against it: the trial
  table is tested on summaries in the API's documented shape. Nothing here asserts a value moto
  makes up; the tests assert what was sent and that the answer was printed.
- The CLI tests run `sm-effdet` once the lead has merged the launch branch (skipped before).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from botocore.validate import validate_parameters
from conftest import push_image

from sm_effdet.errors import UserInputError
from sm_effdet.hyperparameters import parse_hyperparameters
from sm_effdet.launch import deploy, hosting, transform, tuning
from sm_effdet.launch.upload import split_s3
from sm_effdet.launch.validation import check_request, service_model

REPO = Path(__file__).resolve().parents[1]
METRICS = json.loads((REPO / "metric_definitions.json").read_text())
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/sm-effdet:t1"
ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"
BUCKET = "sm-effdet-test"


def training_request(name: str = "sm-effdet-tf-lite0-20261203-074500", spot: bool = True) -> dict:
    """A minimal CreateTrainingJob request of this project's shape, written by the test."""
    request = {
        "TrainingJobName": name,
        "RoleArn": ROLE,
        "AlgorithmSpecification": {
            "TrainingImage": IMAGE,
            "TrainingInputMode": "FastFile",
            "MetricDefinitions": METRICS,
            "EnableSageMakerMetricsTimeSeries": True,
        },
        "HyperParameters": {
            "backbone": "tf_lite0", "epochs": "20", "learning_rate": "0.002", "batch_size": "8",
        },
        "InputDataConfig": [{
            "ChannelName": "training",
            "DataSource": {"S3DataSource": {
                "S3DataType": "S3Prefix", "S3Uri": f"s3://{BUCKET}/sm-effdet/shapes/data/training/",
                "S3DataDistributionType": "FullyReplicated",
            }},
        }],
        "OutputDataConfig": {"S3OutputPath": f"s3://{BUCKET}/sm-effdet/output"},
        "ResourceConfig": {"InstanceType": "ml.g5.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 50},
        "StoppingCondition": {"MaxRuntimeInSeconds": 3600},
        "TensorBoardOutputConfig": {
            "S3OutputPath": f"s3://{BUCKET}/sm-effdet/tensorboard",
            "LocalPath": "/opt/ml/output/tensorboard",
        },
        "Tags": [{"Key": "project", "Value": "sm-effdet"}],
    }
    if spot:
        request["EnableManagedSpotTraining"] = True
        request["StoppingCondition"]["MaxWaitTimeInSeconds"] = 7200
        request["CheckpointConfig"] = {
            "S3Uri": f"s3://{BUCKET}/sm-effdet/checkpoints/{name}",
            "LocalPath": "/opt/ml/checkpoints",
        }
        request["RetryStrategy"] = {"MaximumRetryAttempts": 3}
    check_request("CreateTrainingJob", request)
    return request


def botocore_valid(operation: str, request: dict) -> None:
    """botocore's own validation (what a client checks before sending), run directly."""
    shape = service_model().operation_model(operation).input_shape
    validate_parameters(request, shape)


def one_sentence(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and text.endswith(".") and len(text) <= 1024, text
    return text


# --- tune: requests ----------------------------------------------------------------------


def test_tuning_request_from_a_spot_training_request_with_the_default_space():
    train = training_request()
    ranges = tuning.parameter_ranges(tuning.default_search_space(train["HyperParameters"]))
    request = tuning.tuning_job_request(
        train, name="sm-effdet-tf-lite0-261203-074500", parameter_ranges=ranges, max_jobs=12,
        max_parallel_jobs=2,
    )
    botocore_valid("CreateHyperParameterTuningJob", request)
    config = request["HyperParameterTuningJobConfig"]
    assert config["Strategy"] == "Bayesian" and config["TrainingJobEarlyStoppingType"] == "Auto"
    assert config["HyperParameterTuningJobObjective"] == {"Type": "Maximize", "MetricName": "validation:mAP"}
    assert "validation:mAP" in [m["Name"] for m in METRICS]
    assert config["ResourceLimits"] == {"MaxNumberOfTrainingJobs": 12, "MaxParallelTrainingJobs": 2}
    assert config["ParameterRanges"]["ContinuousParameterRanges"][0] == {
        "Name": "learning_rate", "MinValue": "0.0001", "MaxValue": "0.01", "ScalingType": "Logarithmic",
    }
    assert {"Name": "img_size", "Values": ["384", "512", "640"]} in config["ParameterRanges"]["CategoricalParameterRanges"]
    assert {"Name": "augment", "Values": ["true", "false"]} in config["ParameterRanges"]["CategoricalParameterRanges"]
    definition = request["TrainingJobDefinition"]
    # Static = the job's hyperparameters minus the tuned ones (learning_rate was set, is tuned).
    assert definition["StaticHyperParameters"] == {"backbone": "tf_lite0", "epochs": "20", "batch_size": "8"}
    assert definition["EnableManagedSpotTraining"] is True
    assert definition["StoppingCondition"] == {"MaxRuntimeInSeconds": 3600, "MaxWaitTimeInSeconds": 7200}
    assert definition["RetryStrategy"] == {"MaximumRetryAttempts": 3}
    assert definition["CheckpointConfig"] == {
        "S3Uri": f"s3://{BUCKET}/sm-effdet/checkpoints/sm-effdet-tf-lite0-261203-074500/",
        "LocalPath": "/opt/ml/checkpoints",
    }
    # A tuning definition's algorithm has no EnableSageMakerMetricsTimeSeries (botocore refuses it).
    assert definition["AlgorithmSpecification"] == {
        "TrainingImage": IMAGE, "TrainingInputMode": "FastFile", "MetricDefinitions": METRICS,
    }
    assert definition["InputDataConfig"] == train["InputDataConfig"]
    assert request["Tags"] == train["Tags"]


def test_tuning_request_on_demand_with_a_ranges_file(tmp_path):
    ranges_file = tmp_path / "ranges.json"
    ranges_file.write_text(json.dumps({
        "learning_rate": {"min": 0.0005, "max": 0.005, "scaling": "Logarithmic"},
        "batch_size": {"min": 4, "max": 16},
        "img_size": [512, 768],
        "augment": None,
        "optimizer": ["adamw", "sgd"],
    }))
    train = training_request(spot=False)
    space = tuning.merge_search_space(
        tuning.default_search_space(train["HyperParameters"]), tuning.read_search_space(ranges_file)
    )
    ranges = tuning.parameter_ranges(space, f"the tuning ranges file {ranges_file}")
    request = tuning.tuning_job_request(
        train, name="my-tuning", parameter_ranges=ranges, max_jobs=4, max_parallel_jobs=4,
        strategy="Random", early_stopping="Off",
    )
    botocore_valid("CreateHyperParameterTuningJob", request)
    got = request["HyperParameterTuningJobConfig"]["ParameterRanges"]
    assert got["IntegerParameterRanges"] == [
        {"Name": "batch_size", "MinValue": "4", "MaxValue": "16", "ScalingType": "Auto"}
    ]
    assert sorted(r["Name"] for r in got["ContinuousParameterRanges"]) == ["learning_rate", "warmup_epochs"]
    assert got["CategoricalParameterRanges"] == [
        {"Name": "img_size", "Values": ["512", "768"]}, {"Name": "optimizer", "Values": ["adamw", "sgd"]},
    ]
    definition = request["TrainingJobDefinition"]
    assert "CheckpointConfig" not in definition and "EnableManagedSpotTraining" not in definition
    assert definition["StaticHyperParameters"] == {"backbone": "tf_lite0", "epochs": "20"}
    assert request["HyperParameterTuningJobConfig"]["Strategy"] == "Random"


def test_sgd_gets_sgd_learning_rates():
    space = tuning.default_search_space({"optimizer": "sgd"})
    assert space["learning_rate"]["min"] > 0.001 and space["learning_rate"]["max"] >= 0.1
    tuning.parameter_ranges(space)


def test_a_start_from_the_imagenet_backbone_gets_learning_rates_around_its_own():
    rate = parse_hyperparameters({"pretrained": "backbone"}).peak_learning_rate("backbone")
    space = tuning.default_search_space({"pretrained": '"backbone"'})
    assert space["learning_rate"]["min"] < rate < space["learning_rate"]["max"]
    assert space["learning_rate"]["min"] > tuning.DEFAULT_SEARCH_SPACE["learning_rate"]["min"]
    tuning.parameter_ranges(space)
    # SGD keeps its own range whatever the start.
    assert tuning.default_search_space({"pretrained": "backbone", "optimizer": "sgd"})["learning_rate"] == (
        tuning.SGD_LEARNING_RATE)


@pytest.mark.parametrize(
    "ranges, expected",
    [
        ({"lr": {"min": 0.001, "max": 0.01}}, "names 'lr', which is not a hyperparameter"),
        ({"img_size": [512, 300]}, "'img_size' has invalid value '300'"),
        ({"img_size": {"min": 256, "max": 512}}, "may pick 257 for 'img_size'"),
        ({"warmup_epochs": {"min": -1, "max": 2}}, "'warmup_epochs' has invalid value '-1'"),
        ({"learning_rate": {"min": 0, "max": 0.1, "scaling": "Logarithmic"}}, "invalid value '0'"),
        ({"augment": ["true", "maybe"]}, "'augment' has invalid value 'maybe'"),
        ({"learning_rate": {"min": 0.01, "max": 0.001}}, "min 0.01 not below max 0.001"),
        ({"epochs": 5}, "give a list of values"),
        ({"learning_rate": {"low": 0.001}}, 'must have "min" and "max"'),
    ],
)
def test_a_bad_ranges_file_is_one_sentence_naming_it(tmp_path, ranges, expected):
    path = tmp_path / "ranges.json"
    path.write_text(json.dumps(ranges))
    source = f"the tuning ranges file {path}"
    with pytest.raises(UserInputError) as exc:
        tuning.parameter_ranges(tuning.merge_search_space({}, tuning.read_search_space(path)), source)
    text = one_sentence(exc)
    assert expected in text and str(path) in text


def test_a_ranges_file_that_is_not_json_is_one_sentence(tmp_path):
    path = tmp_path / "ranges.json"
    path.write_text("{learning_rate: 0.1")
    with pytest.raises(UserInputError) as exc:
        tuning.read_search_space(path)
    assert str(path) in one_sentence(exc)


def test_tuning_names_fit_32_characters_and_a_longer_one_is_refused():
    for backbone in ("tf_lite0", "tf_d7", "models.ross.efficientdet.backbones.tf_efficientdet_lite4"):
        name = tuning.tuning_job_name(backbone)
        assert len(name) <= 32 and name.startswith("sm-effdet-")
        check_request("CreateHyperParameterTuningJob", {
            "HyperParameterTuningJobName": name,
            "HyperParameterTuningJobConfig": {"Strategy": "Bayesian", "ResourceLimits": {"MaxNumberOfTrainingJobs": 1, "MaxParallelTrainingJobs": 1}},
        })
    too_long = "sm-effdet-tf-lite0-tuning-20261203-0745"
    with pytest.raises(UserInputError) as exc:
        tuning.tuning_job_request(
            training_request(), name=too_long, parameter_ranges=tuning.parameter_ranges(tuning.DEFAULT_SEARCH_SPACE),
            max_jobs=2, max_parallel_jobs=1,
        )
    text = one_sentence(exc)
    assert too_long in text and "39 characters" in text and "32" in text


def test_the_objective_must_be_one_of_the_metric_definitions():
    train = training_request()
    train["AlgorithmSpecification"]["MetricDefinitions"] = [m for m in METRICS if m["Name"] != "validation:mAP"]
    with pytest.raises(UserInputError) as exc:
        tuning.tuning_job_request(
            train, name="t1", parameter_ranges=tuning.parameter_ranges(tuning.DEFAULT_SEARCH_SPACE),
            max_jobs=2, max_parallel_jobs=1,
        )
    assert "validation:mAP" in one_sentence(exc)


def test_more_parallel_trials_than_trials_is_refused():
    with pytest.raises(UserInputError) as exc:
        tuning.tuning_job_request(
            training_request(), name="t1", parameter_ranges=tuning.parameter_ranges(tuning.DEFAULT_SEARCH_SPACE),
            max_jobs=2, max_parallel_jobs=3,
        )
    assert "--max-parallel-jobs (3)" in one_sentence(exc)


def test_trial_table_and_best_trial_from_summaries_in_the_api_shape():
    # ListTrainingJobsForHyperParameterTuningJob's TrainingJobSummaries (moto lacks the call).
    trials = [
        {"TrainingJobName": "t1-001-aaaa", "TrainingJobStatus": "Completed",
         "TunedHyperParameters": {"learning_rate": "0.0012", "img_size": '"512"'},
         "FinalHyperParameterTuningJobObjectiveMetric": {"MetricName": "validation:mAP", "Value": 0.41234}},
        {"TrainingJobName": "t1-002-bbbb", "TrainingJobStatus": "InProgress",
         "TunedHyperParameters": {"learning_rate": "0.0003", "img_size": "640"}},
    ]
    table = tuning.trial_table(trials, ["learning_rate", "img_size"]).splitlines()
    assert table[0].split() == ["trial", "status", "validation:mAP", "learning_rate", "img_size"]
    assert table[1].split() == ["t1-001-aaaa", "Completed", "0.4123", "0.0012", "512"]
    assert table[2].split() == ["t1-002-bbbb", "InProgress", "-", "0.0003", "640"]
    best = tuning.best_trial_text({"BestTrainingJob": trials[0]})
    assert best.startswith("Best trial: t1-001-aaaa validation:mAP=0.4123")
    assert "sm-effdet deploy t1-001-aaaa" in best


# --- deploy / transform: requests --------------------------------------------------------


def test_model_endpoint_config_endpoint_and_transform_requests_are_valid():
    model = hosting.model_request(
        "ep-20261203-074500", image=IMAGE, model_data=f"s3://{BUCKET}/out/job/output/model.tar.gz",
        role=ROLE, environment={"SERVE_SCORE_THRESHOLD": "0.5"},
    )
    botocore_valid("CreateModel", model)
    assert model["PrimaryContainer"]["Environment"] == {"SERVE_SCORE_THRESHOLD": "0.5"}
    config = hosting.endpoint_config_request(
        "ep-20261203-074500", model_name="ep-20261203-074500", instance_type="ml.g5.xlarge", instance_count=2,
    )
    botocore_valid("CreateEndpointConfig", config)
    assert config["ProductionVariants"][0]["InitialInstanceCount"] == 2
    botocore_valid("CreateEndpoint", hosting.endpoint_request("ep", "ep-20261203-074500"))
    botocore_valid("UpdateEndpoint", hosting.update_endpoint_request("ep", "ep-20261203-080000"))
    invoke = hosting.invoke_request("ep", deploy.generated_png(), "image/png")
    validate_parameters(invoke, service_model("sagemaker-runtime").operation_model("InvokeEndpoint").input_shape)
    images = hosting.transform_request(
        "tj1", model_name="m1", input_uri=f"s3://{BUCKET}/images/", output_uri=f"s3://{BUCKET}/detections/",
    )
    botocore_valid("CreateTransformJob", images)
    assert images["TransformInput"]["ContentType"] == "image/jpeg" and images["TransformInput"]["SplitType"] == "None"
    lines = hosting.transform_request(
        "tj2", model_name="m1", input_uri=f"s3://{BUCKET}/lines/", output_uri=f"s3://{BUCKET}/detections/",
        content_type="application/jsonlines", environment={"SERVE_MAX_DETECTIONS": "10"},
    )
    botocore_valid("CreateTransformJob", lines)
    assert lines["TransformInput"]["SplitType"] == "Line" and lines["BatchStrategy"] == "MultiRecord"


@pytest.mark.parametrize(
    "build, expected",
    [
        (lambda: hosting.endpoint_config_request("ep", model_name="m", instance_type="ml.x9.huge", instance_count=1),
         "ml.x9.huge"),
        (lambda: hosting.model_request("my_model", image=IMAGE, model_data="s3://b/m.tar.gz", role=ROLE),
         "my_model"),
        (lambda: hosting.endpoint_request("e" * 64, "c"), "64 characters"),
    ],
)
def test_requests_sagemaker_would_refuse_are_one_sentence(build, expected):
    with pytest.raises(UserInputError) as exc:
        build()
    assert expected in one_sentence(exc)


def test_resource_names_fit_and_env_pairs():
    name = hosting.resource_name("e" * 63, "20261203-074500")
    assert len(name) == 63 and name.endswith("-20261203-074500")
    assert hosting.parse_env(["SERVE_SCORE_THRESHOLD=0.5", "A=b=c"]) == {"SERVE_SCORE_THRESHOLD": "0.5", "A": "b=c"}
    with pytest.raises(UserInputError) as exc:
        hosting.parse_env(["SERVE_SCORE_THRESHOLD"])
    assert "KEY=VALUE" in one_sentence(exc)


def test_the_generated_image_is_a_real_png():
    from PIL import Image

    body, content_type, _ = deploy.sample_image(None)
    image = Image.open(io.BytesIO(body))
    image.load()
    assert content_type == "image/png" and image.size == (256, 256) and image.mode == "RGB"
    assert image.getpixel((50, 50)) == (200, 40, 40) and image.getpixel((5, 5)) == (128, 128, 128)
    # serve's own decoder (what the endpoint runs on the body) takes it.
    from sm_effdet.model.preprocessing import decode_image

    array, size = decode_image(body, 512)
    assert size == (256, 256) and array.shape[2] == 3


# --- Emulated flows (moto's server on 127.0.0.1) -----------------------------------------


@pytest.fixture
def clients(aws):
    import boto3

    made = {name: boto3.client(name) for name in ("sagemaker", "s3", "sagemaker-runtime")}
    made["s3"].create_bucket(Bucket=BUCKET)
    return made


def model_tarball() -> bytes:
    """A stand-in model.tar.gz (moto's training writes nothing to S3); deploy only checks that
    it exists, SageMaker would extract it into /opt/ml/model."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        data = b'{"backbone": "tf_lite0"}'
        info = tarfile.TarInfo("model.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def completed_job(clients, name: str = "sm-effdet-tf-lite0-20261203-074500") -> str:
    """A training job in the emulator (Completed at once there) and its model.tar.gz in S3."""
    request = training_request(name)
    clients["sagemaker"].create_training_job(**request)
    uri = clients["sagemaker"].describe_training_job(TrainingJobName=name)["ModelArtifacts"]["S3ModelArtifacts"]
    bucket, key = split_s3(uri)
    clients["s3"].put_object(Bucket=bucket, Key=key, Body=model_tarball())
    return uri


def parsed(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sm-effdet")
    subparsers = parser.add_subparsers(dest="command", required=True)
    deploy.add_commands(subparsers)
    transform.add_commands(subparsers)
    return parser.parse_args(argv)


def text_sample(tmp_path: Path, name: str = "photo.png") -> Path:
    """What moto's InvokeEndpoint can take (UTF-8 bytes); the launcher never decodes it."""
    path = tmp_path / name
    path.write_text("an image, as far as the emulator knows")
    return path


def test_emulated_deploy_from_a_training_job(clients, tmp_path):
    uri = completed_job(clients)
    out = io.StringIO()
    sample = text_sample(tmp_path)
    args = parsed("deploy", "sm-effdet-tf-lite0-20261203-074500", "--env", "SERVE_SCORE_THRESHOLD=0.4",
                  "--sample", str(sample))
    code = args.run(args, sagemaker=clients["sagemaker"], runtime=clients["sagemaker-runtime"], s3=clients["s3"], out=out)
    text = out.getvalue()
    assert code == 0, text
    sm = clients["sagemaker"]
    endpoint = sm.describe_endpoint(EndpointName="sm-effdet-tf-lite0-20261203-074500")
    assert endpoint["EndpointStatus"] == "InService"
    config = sm.describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
    variant = config["ProductionVariants"][0]
    assert variant["InstanceType"] == "ml.m5.xlarge" and variant["InitialInstanceCount"] == 1
    model = sm.describe_model(ModelName=variant["ModelName"])
    # The job's model, image and role were found for the user.
    assert model["PrimaryContainer"]["ModelDataUrl"] == uri
    assert model["PrimaryContainer"]["Image"] == IMAGE and model["ExecutionRoleArn"] == ROLE
    assert model["PrimaryContainer"]["Environment"] == {"SERVE_SCORE_THRESHOLD": "0.4"}
    for line in ("CreateModel ", "CreateEndpointConfig ", "CreateEndpoint sm-effdet-tf-lite0-20261203-074500",
                 "InService", f"InvokeEndpoint sm-effdet-tf-lite0-20261203-074500 with {sample} (image/png"):
        assert line in text, text
    # moto's made-up answer, printed as it came.
    assert text.split("bytes):\n", 1)[1].startswith("body"), text


def test_emulated_deploy_a_model_uri_with_a_sample_image(clients, tmp_path):
    uri = completed_job(clients)
    sample = text_sample(tmp_path, "photo.jpg")
    out = io.StringIO()
    args = parsed("deploy", uri, "--image", IMAGE, "--role", ROLE, "--endpoint-name", "my-endpoint",
                  "--sample", str(sample), "--instance-type", "ml.g4dn.xlarge")
    assert args.run(args, sagemaker=clients["sagemaker"], runtime=clients["sagemaker-runtime"], s3=clients["s3"], out=out) == 0
    assert f"InvokeEndpoint my-endpoint with {sample} (image/jpeg" in out.getvalue()
    assert "(training job" not in out.getvalue()
    config_name = clients["sagemaker"].describe_endpoint(EndpointName="my-endpoint")["EndpointConfigName"]
    assert config_name.startswith("my-endpoint-")


def test_emulated_a_refused_endpoint_config_leaves_no_model_behind(clients, tmp_path):
    # moto's list of instance types is older than botocore's: it refuses ml.g5.xlarge, which
    # the service model (and SageMaker) know. That is an API refusal after CreateModel.
    from botocore.exceptions import ClientError

    completed_job(clients)
    args = parsed("deploy", "sm-effdet-tf-lite0-20261203-074500", "--instance-type", "ml.g5.xlarge")
    with pytest.raises(ClientError) as exc:
        args.run(args, sagemaker=clients["sagemaker"], runtime=clients["sagemaker-runtime"], s3=clients["s3"], out=io.StringIO())
    assert exc.value.operation_name == "CreateEndpointConfig"
    _nothing_created(clients)


def _nothing_created(clients) -> None:
    sm = clients["sagemaker"]
    assert sm.list_models()["Models"] == []
    assert sm.list_endpoint_configs()["EndpointConfigs"] == []
    assert sm.list_endpoints()["Endpoints"] == []
    assert sm.list_transform_jobs()["TransformJobSummaries"] == []


def test_emulated_deploy_of_a_job_that_is_not_completed_is_one_sentence(clients):
    completed_job(clients, "still-training")
    # moto makes every job Completed at once; its own record is set to the status a real job
    # has for its first minutes.
    moto_record("training_jobs", "still-training").training_job_status = "InProgress"
    args = parsed("deploy", "still-training")
    with pytest.raises(UserInputError) as exc:
        args.run(args, sagemaker=clients["sagemaker"], runtime=clients["sagemaker-runtime"], s3=clients["s3"], out=io.StringIO())
    text = one_sentence(exc)
    assert "still-training is InProgress, not Completed" in text and "sm-effdet logs still-training" in text
    _nothing_created(clients)


def moto_record(kind: str, name: str):
    """moto's own record of a resource, to give it a status moto never reaches by itself."""
    from moto.sagemaker.models import sagemaker_backends

    return getattr(sagemaker_backends["123456789012"]["us-east-1"], kind)[name]


def test_emulated_a_failed_endpoint_gives_its_failure_reason(clients, tmp_path):
    completed_job(clients)
    args = parsed("deploy", "sm-effdet-tf-lite0-20261203-074500", "--endpoint-name", "ep-fails", "--no-wait")
    assert args.run(args, sagemaker=clients["sagemaker"], runtime=clients["sagemaker-runtime"], s3=clients["s3"], out=io.StringIO()) == 0
    endpoint = moto_record("endpoints", "ep-fails")
    endpoint.endpoint_status = "Failed"
    endpoint.failure_reason = "The primary container for production variant AllTraffic did not pass the ping health check."
    out = io.StringIO()
    description = hosting.wait_for(
        lambda: clients["sagemaker"].describe_endpoint(EndpointName="ep-fails"), "EndpointStatus",
        done="InService", out=out, poll_seconds=0, timeout_seconds=60,
    )
    assert out.getvalue().split() == ["00:00", "Failed"]
    problem = hosting._ended(description, "EndpointStatus", "InService", "endpoint ep-fails", 30)
    assert problem == ("endpoint ep-fails is Failed: The primary container for production variant AllTraffic did "
                       "not pass the ping health check.")


def test_emulated_the_wait_is_bounded(clients):
    completed_job(clients)
    args = parsed("deploy", "sm-effdet-tf-lite0-20261203-074500", "--endpoint-name", "slow", "--no-wait")
    assert args.run(args, sagemaker=clients["sagemaker"], runtime=clients["sagemaker-runtime"], s3=clients["s3"], out=io.StringIO()) == 0
    moto_record("endpoints", "slow").endpoint_status = "Creating"
    out, calls = io.StringIO(), []

    def describe():
        calls.append(1)
        return clients["sagemaker"].describe_endpoint(EndpointName="slow")

    description = hosting.wait_for(describe, "EndpointStatus", done="InService", out=out, poll_seconds=0.3, timeout_seconds=1)
    assert 2 <= len(calls) <= 6
    assert out.getvalue().split() == ["00:00", "Creating"]  # printed once, not at every poll
    problem = hosting._ended(description, "EndpointStatus", "InService", "endpoint slow", 1 / 60)
    assert problem.startswith("endpoint slow is still Creating after")


def test_emulated_an_endpoint_being_created_is_not_updated(clients):
    completed_job(clients)
    given = {"sagemaker": clients["sagemaker"], "runtime": clients["sagemaker-runtime"], "s3": clients["s3"]}
    args = parsed("deploy", "sm-effdet-tf-lite0-20261203-074500", "--endpoint-name", "busy", "--no-wait")
    assert args.run(args, **given, out=io.StringIO()) == 0
    moto_record("endpoints", "busy").endpoint_status = "Creating"
    with pytest.raises(UserInputError) as exc:
        args.run(args, **given, out=io.StringIO())
    assert "endpoint busy exists and is Creating" in one_sentence(exc)
    assert len(clients["sagemaker"].list_models()["Models"]) == 1  # the first deploy's only


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["deploy", f"s3://{BUCKET}/nowhere/model.tar.gz", "--image", IMAGE, "--role", ROLE], "does not exist"),
        (["deploy", "MODEL", "--role", ROLE], "pass --image"),
        (["deploy", "MODEL", "--image", IMAGE], "pass --role"),
        (["deploy", "MODEL", "--image", IMAGE, "--role", ROLE, "--env", "NOEQUALS"], "KEY=VALUE"),
        (["deploy", "MODEL", "--image", IMAGE, "--role", ROLE, "--instance-type", "ml.nope"], "ml.nope"),
        (["transform", "MODEL", "--image", IMAGE, "--role", ROLE, "--input", f"s3://{BUCKET}/empty/"], "no objects under"),
        (["transform", "MODEL", "--image", IMAGE, "--role", ROLE, "--input", "/data/images"], "not an S3 URI"),
    ],
)
def test_emulated_bad_deploy_and_transform_input_creates_nothing(clients, argv, expected):
    uri = completed_job(clients)
    args = parsed(*[uri if a == "MODEL" else a for a in argv])
    given = {"sagemaker": clients["sagemaker"], "s3": clients["s3"]}
    if args.command == "deploy":
        given["runtime"] = clients["sagemaker-runtime"]
    with pytest.raises(UserInputError) as exc:
        args.run(args, **given, out=io.StringIO())
    assert expected in one_sentence(exc)
    _nothing_created(clients)


def test_emulated_transform_from_a_training_job(clients):
    completed_job(clients)
    for k in range(3):
        clients["s3"].put_object(Bucket=BUCKET, Key=f"images/{k}.jpg", Body=b"\xff\xd8 an image")
    out = io.StringIO()
    args = parsed("transform", "sm-effdet-tf-lite0-20261203-074500", "--input", f"s3://{BUCKET}/images/",
                  "--env", "SERVE_MAX_DETECTIONS=20", "--name", "detect-shapes")
    assert args.run(args, sagemaker=clients["sagemaker"], s3=clients["s3"], out=out) == 0, out.getvalue()
    job = clients["sagemaker"].describe_transform_job(TransformJobName="detect-shapes")
    assert job["ModelName"] == "detect-shapes"
    assert job["TransformInput"]["DataSource"]["S3DataSource"]["S3Uri"] == f"s3://{BUCKET}/images/"
    assert job["TransformInput"]["ContentType"] == "image/jpeg"
    output = f"s3://{BUCKET}/sm-effdet/transform/detect-shapes/"
    assert job["TransformOutput"]["S3OutputPath"] == output
    model = clients["sagemaker"].describe_model(ModelName="detect-shapes")
    assert model["PrimaryContainer"]["Environment"] == {"SERVE_MAX_DETECTIONS": "20"}
    text = out.getvalue()
    assert "CreateTransformJob detect-shapes: 3 objects under" in text
    # moto's transform writes nothing: the listing is real, its count is moto's (0).
    assert f"Results: {output} (" in text


def test_emulated_tuning_job_is_created_as_built(clients):
    train = training_request()
    request = tuning.tuning_job_request(
        train, name="sm-effdet-tf-lite0-261203-074500",
        parameter_ranges=tuning.parameter_ranges(tuning.DEFAULT_SEARCH_SPACE), max_jobs=6, max_parallel_jobs=2,
    )
    sm = clients["sagemaker"]
    sm.create_hyper_parameter_tuning_job(**request)
    got = sm.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName="sm-effdet-tf-lite0-261203-074500")
    assert got["HyperParameterTuningJobConfig"] == request["HyperParameterTuningJobConfig"]
    assert got["TrainingJobDefinition"]["StaticHyperParameters"] == request["TrainingJobDefinition"]["StaticHyperParameters"]
    assert got["TrainingJobDefinition"]["CheckpointConfig"] == request["TrainingJobDefinition"]["CheckpointConfig"]
    # moto's best trial is made up: only that it is printed in the sentence's shape.
    assert tuning.best_trial_text(got).startswith("Best trial: ")


# --- The CLI (after the merge) -----------------------------------------------------------


def sm_effdet(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    code = "import sys; from sm_effdet.launch.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *argv], check=False, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=os.environ.copy())


def job_flags() -> list[str]:
    return ["--data", f"s3://{BUCKET}/sm-effdet/shapes/data/training/", "--role", ROLE,
            "--bucket", BUCKET, "--image", IMAGE, "--set", "epochs=5", "--set", "learning_rate=0.002"]


def test_emulated_cli_tune_dry_run_prints_a_valid_request(clients):
    result = sm_effdet("tune", *job_flags(), "--dry-run", "--max-jobs", "8")
    assert result.returncode == 0, result.stderr
    request = json.loads(result.stdout[result.stdout.index("{"):])
    check_request("CreateHyperParameterTuningJob", request)
    assert len(request["HyperParameterTuningJobName"]) <= 32
    assert "learning_rate" not in request["TrainingJobDefinition"]["StaticHyperParameters"]
    assert clients["sagemaker"].list_hyper_parameter_tuning_jobs()["HyperParameterTuningJobSummaries"] == []


def test_emulated_cli_tune_creates_the_job(clients, tmp_path):
    ranges = tmp_path / "ranges.json"
    ranges.write_text(json.dumps({"batch_size": [4, 8], "augment": None}))
    push_image(IMAGE)  # tune checks in ECR that the image was pushed
    result = sm_effdet("tune", *job_flags(), "--ranges", str(ranges), "--name", "shapes-tuning", "--no-wait")
    assert result.returncode == 0, result.stderr
    got = clients["sagemaker"].describe_hyper_parameter_tuning_job(HyperParameterTuningJobName="shapes-tuning")
    names = [r["Name"] for r in got["HyperParameterTuningJobConfig"]["ParameterRanges"]["CategoricalParameterRanges"]]
    assert "batch_size" in names and "augment" not in names


@pytest.mark.parametrize(
    "extra, ranges, expected",
    [
        (["--name", "a-tuning-job-name-of-39-characters-long"], None, "39 characters long"),
        ([], {"learning_rte": {"min": 0.001, "max": 0.01}}, "learning_rte"),
        ([], {"img_size": [100]}, "'img_size' has invalid value '100'"),
    ],
)
def test_emulated_cli_tune_bad_input_exits_2_with_one_sentence_and_creates_nothing(clients, tmp_path, extra, ranges, expected):
    if ranges is not None:
        (tmp_path / "r.json").write_text(json.dumps(ranges))
        extra = [*extra, "--ranges", str(tmp_path / "r.json")]
    result = sm_effdet("tune", *job_flags(), *extra)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sm-effdet: ") and expected in lines[0], result.stderr
    assert clients["sagemaker"].list_hyper_parameter_tuning_jobs()["HyperParameterTuningJobSummaries"] == []


def test_emulated_cli_deploy_and_transform(clients, tmp_path):
    completed_job(clients)
    result = sm_effdet("deploy", "sm-effdet-tf-lite0-20261203-074500", "--sample", str(text_sample(tmp_path)))
    assert result.returncode == 0, result.stderr
    assert "InService" in result.stdout and "InvokeEndpoint" in result.stdout
    clients["s3"].put_object(Bucket=BUCKET, Key="images/a.jpg", Body=b"\xff\xd8")
    result = sm_effdet("transform", "sm-effdet-tf-lite0-20261203-074500", "--input", f"s3://{BUCKET}/images/")
    assert result.returncode == 0, result.stderr
    assert "Results: s3://" in result.stdout


def test_emulated_make_deploy_calls_sm_effdet_deploy(clients, tmp_path):
    uri = completed_job(clients)
    sm_effdet_exe = f"{sys.executable} -c 'import sys; from sm_effdet.launch.cli import main; sys.exit(main(sys.argv[1:]))'"
    result = subprocess.run(
        ["make", "deploy", f"MODEL_DATA={uri}", f"ROLE={ROLE}", f"IMAGE_URI={IMAGE}", "DEPLOY_NAME=made-endpoint",
         "SERVE_ENV=SERVE_SCORE_THRESHOLD=0.5", f"SM_EFFDET={sm_effdet_exe}",
         f"SAMPLE={text_sample(tmp_path)}"],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    endpoint = clients["sagemaker"].describe_endpoint(EndpointName="made-endpoint")
    config = clients["sagemaker"].describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
    model = clients["sagemaker"].describe_model(ModelName=config["ProductionVariants"][0]["ModelName"])
    assert model["PrimaryContainer"]["Environment"] == {"SERVE_SCORE_THRESHOLD": "0.5"}
