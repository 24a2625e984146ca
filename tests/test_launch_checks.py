"""The launcher's checks of issue 26: what AWS would refuse, misuse or mix is refused (or set
right) on this machine, before anything is uploaded or created.

Two kinds of tests, as each name says. Emulated tests (test_emulated_*) run the real
`sm-effdet` against moto's server on 127.0.0.1 (the `aws` fixture: S3, ECR, SageMaker) and
assert what moto's S3 really holds, what the job was created with, and that a refusal left the
bucket empty and created no job; what moto makes up (job states, metrics) is never asserted. The
other tests build requests offline and check them with botocore's SageMaker model
(launch/validation.check_request), which also runs the rules the model's docs state.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
from conftest import push_image

from sm_effdet.demo import make_shapes_dataset
from sm_effdet.errors import UserInputError
from sm_effdet.launch import tuning
from sm_effdet.launch.cli import build_parser, main
from sm_effdet.launch.images import check_image_pushed, default_image
from sm_effdet.launch.request import build_training_request
from sm_effdet.launch.validation import check_request

REPO = Path(__file__).resolve().parents[1]
SM_EFFDET = REPO / "sm-effdet"
ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"
BUCKET = "sm-effdet-checks"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/sm-effdet:pushed1"


def sm_effdet(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SM_EFFDET), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def refused(capsys, *argv: str) -> str:
    """Run the command in this process; it must exit 2 with one sentence on stderr."""
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("sm-effdet: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def objects(s3) -> dict[str, bytes]:
    """Every object in every bucket of the emulator, by bucket/key, with its bytes."""
    found = {}
    for bucket in s3.list_buckets()["Buckets"]:
        for item in s3.list_objects_v2(Bucket=bucket["Name"]).get("Contents", []):
            body = s3.get_object(Bucket=bucket["Name"], Key=item["Key"])["Body"].read()
            found[f"{bucket['Name']}/{item['Key']}"] = body
    return found


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def clients(aws):
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    push_image(IMAGE)
    return {"s3": s3, "sagemaker": boto3.client("sagemaker"), "ecr": boto3.client("ecr")}


def nothing_created(clients) -> None:
    assert objects(clients["s3"]) == {}
    assert clients["sagemaker"].list_training_jobs()["TrainingJobSummaries"] == []
    assert clients["sagemaker"].list_hyper_parameter_tuning_jobs()[
        "HyperParameterTuningJobSummaries"] == []


def job_args(data: Path | str, *extra: str) -> list[str]:
    return ["--data", str(data), "--role", ROLE, "--bucket", BUCKET, "--image", IMAGE,
            "--set", "epochs=1", *extra]


def channel_uri(sagemaker, job: str, channel: str = "training") -> str:
    sent = sagemaker.describe_training_job(TrainingJobName=job)["InputDataConfig"]
    return next(c["DataSource"]["S3DataSource"]["S3Uri"] for c in sent if c["ChannelName"] == channel)


def held(s3, uri: str) -> dict[str, bytes]:
    """The objects under an s3:// prefix, by their key below it: what the job's channel gets."""
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    return {key[len(bucket) + 1 + len(prefix):]: body for key, body in objects(s3).items()
            if key.startswith(f"{bucket}/{prefix}")}


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """This process's environment with a region and no AWS credentials or endpoint: a dry run
    needs nothing else."""
    for key, value in no_aws_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    for key in [k for k in os.environ if k.startswith("AWS_") and k not in no_aws_env(tmp_path)]:
        monkeypatch.delenv(key)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("checks") / "shapes"
    make_shapes_dataset(folder, n_images=6, size=(96, 64))
    return folder


# ---------------------------------------------------------------- 1: datasets never mix


def summary_counts(stdout: str) -> tuple[int, int]:
    """(images listed, classes) from the local check's summary line."""
    match = re.search(r"data: (\d+) images .*?; (\d+) classes", stdout)
    assert match, stdout
    return int(match[1]), int(match[2])


def test_emulated_two_folders_with_one_name_upload_apart_and_each_job_gets_its_own(clients, tmp_path):
    a, b = tmp_path / "projA" / "data", tmp_path / "projB" / "data"
    make_shapes_dataset(a, n_images=3, size=(96, 64), seed=0)
    make_shapes_dataset(b, n_images=8, size=(96, 64), seed=5)
    runs = {}
    for job, folder in (("job-a", a), ("job-b", b)):
        done = sm_effdet("train", *job_args(folder, "--name", job, "--no-wait"))
        assert done.returncode == 0, done.stderr
        runs[job] = done.stdout
    uri_a = channel_uri(clients["sagemaker"], "job-a")
    uri_b = channel_uri(clients["sagemaker"], "job-b")
    assert uri_a != uri_b and "/data-" in uri_a and "/data-" in uri_b
    # Each channel holds exactly its folder's files, byte for byte: nothing of the other.
    assert held(clients["s3"], uri_a) == folder_files(a)
    assert held(clients["s3"], uri_b) == folder_files(b)
    # What the local check read is what the job gets: its image and class counts, taken from
    # the summary it printed, against the annotations the channel holds.
    for job, uri in (("job-a", uri_a), ("job-b", uri_b)):
        images, classes = summary_counts(runs[job])
        coco = json.loads(held(clients["s3"], uri)["annotations.json"])
        assert images == len(coco["images"]) == sum(
            1 for k in held(clients["s3"], uri) if k.startswith("images/"))
        assert classes == len({c["id"] for c in coco["categories"]})

    # A file deleted locally is not trained on again: the folder is a new dataset.
    removed = sorted((a / "images").iterdir())[0]
    removed.unlink()
    coco = json.loads((a / "annotations.json").read_text())
    coco["images"] = [i for i in coco["images"] if i["file_name"] != f"images/{removed.name}"]
    (a / "annotations.json").write_text(json.dumps(coco))
    done = sm_effdet("train", *job_args(a, "--name", "job-a2", "--no-wait"))
    assert done.returncode == 0, done.stderr
    uri_a2 = channel_uri(clients["sagemaker"], "job-a2")
    assert uri_a2 != uri_a and held(clients["s3"], uri_a2) == folder_files(a)
    assert summary_counts(done.stdout)[0] == 2


def test_emulated_a_prefix_holding_what_the_folder_lacks_is_refused_or_synced(clients, shapes, capsys):
    done = sm_effdet("train", *job_args(shapes, "--name", "job-1", "--no-wait"))
    assert done.returncode == 0, done.stderr
    uri = channel_uri(clients["sagemaker"], "job-1")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    # Another writer (or an older upload) left an object the folder does not have.
    clients["s3"].put_object(Bucket=bucket, Key=prefix + "images/stale.jpg", Body=b"old")
    before = objects(clients["s3"])

    err = refused(capsys, "train", *job_args(shapes, "--name", "job-2", "--no-wait"))
    assert f"{uri} holds 1 object that {shapes} lacks (e.g. stale.jpg)" in err and "--sync" in err
    assert objects(clients["s3"]) == before
    assert [j["TrainingJobName"] for j in clients["sagemaker"].list_training_jobs()[
        "TrainingJobSummaries"]] == ["job-1"]

    done = sm_effdet("train", *job_args(shapes, "--name", "job-2", "--no-wait", "--sync"))
    assert done.returncode == 0, done.stderr
    assert f"--sync: deleted 1 object from {uri}" in done.stdout
    assert channel_uri(clients["sagemaker"], "job-2") == uri
    assert held(clients["s3"], uri) == folder_files(shapes)


# ---------------------------------------------------------------- 2, 3: tuning strategies, scaling


def training_request(**overrides) -> dict:
    kwargs = dict(
        name="tune-base", role=ROLE, image=IMAGE,
        channels={"training": "s3://bkt/sm-effdet/datasets/shapes-0123456789ab/"},
        output_path="s3://bkt/sm-effdet/jobs", hyperparameters={"epochs": "7"},
        checkpoint_uri="s3://bkt/sm-effdet/checkpoints/tune-base", tensorboard_uri=None,
    )
    kwargs.update(overrides)
    return build_training_request(**kwargs)


def tune_request(space: dict, **kwargs) -> dict:
    kwargs.setdefault("max_jobs", None)
    kwargs.setdefault("max_parallel_jobs", 2)
    return tuning.tuning_job_request(training_request(), name="t-1",
                                     parameter_ranges=tuning.parameter_ranges(space), **kwargs)


def test_hyperband_is_sent_with_early_stopping_off_and_the_jobs_epochs_as_its_resource():
    request = tune_request(tuning.DEFAULT_SEARCH_SPACE, strategy="Hyperband")
    check_request("CreateHyperParameterTuningJob", request)  # the model, and its docs' rules
    config = request["HyperParameterTuningJobConfig"]
    assert config["TrainingJobEarlyStoppingType"] == "Off"
    assert config["StrategyConfig"]["HyperbandStrategyConfig"] == {"MinResource": 1, "MaxResource": 7}
    assert tune_request(tuning.DEFAULT_SEARCH_SPACE)["HyperParameterTuningJobConfig"][
        "TrainingJobEarlyStoppingType"] == "Auto"  # Bayesian keeps SageMaker's early stopping

    with pytest.raises(UserInputError, match="TrainingJobEarlyStoppingType Off"):
        tune_request(tuning.DEFAULT_SEARCH_SPACE, strategy="Hyperband", early_stopping="Auto")
    with pytest.raises(UserInputError, match="instead of tuning it"):
        tune_request({"epochs": [2, 4]}, strategy="Hyperband")
    # A request built elsewhere (a DAG, by hand) with Auto is refused by the check itself.
    config["TrainingJobEarlyStoppingType"] = "Auto"
    with pytest.raises(UserInputError, match="requires TrainingJobEarlyStoppingType Off"):
        check_request("CreateHyperParameterTuningJob", request)


def test_grid_takes_categorical_values_only_and_runs_every_combination():
    with pytest.raises(UserInputError) as caught:
        tune_request(tuning.DEFAULT_SEARCH_SPACE, strategy="Grid")
    message = str(caught.value)
    ranged = [name for name, entry in tuning.DEFAULT_SEARCH_SPACE.items() if isinstance(entry, dict)]
    assert all(f"{name}" in message for name in ranged) and "as lists in --ranges" in message
    # The example it gives is a ranges file Grid takes.
    example = json.loads(message[message.index("e.g. ") + 5: message.rindex("}") + 1])
    assert sorted(example) == sorted(ranged)
    grid = {**tuning.DEFAULT_SEARCH_SPACE, **example}
    request = tune_request(grid, strategy="Grid")
    check_request("CreateHyperParameterTuningJob", request)
    combinations = math.prod(len(values) for values in grid.values())
    assert request["HyperParameterTuningJobConfig"]["ResourceLimits"]["MaxNumberOfTrainingJobs"] == combinations
    with pytest.raises(UserInputError, match=f"{combinations} trials here"):
        tune_request(grid, strategy="Grid", max_jobs=5)


@pytest.mark.parametrize("space, words", [
    ({"learning_rate": {"min": 0.001, "max": 5, "scaling": "ReverseLogarithmic"}},
     "within [0, 1) only, not 0.001 to 5"),
    ({"epochs": {"min": 1, "max": 5, "scaling": "ReverseLogarithmic"}},
     "ReverseLogarithmic scaling is for continuous ranges only"),
    ({"ema_decay": {"min": 0, "max": 0.99, "scaling": "Logarithmic"}}, "takes values above 0 only"),
])
def test_scaling_types_outside_their_domain_are_refused_with_one_sentence(space, words, tmp_path):
    path = tmp_path / "ranges.json"
    path.write_text(json.dumps(space))
    with pytest.raises(UserInputError) as caught:
        tuning.parameter_ranges(tuning.read_search_space(path), f"the tuning ranges file {path}")
    assert words in str(caught.value) and str(path) in str(caught.value)
    assert "\n" not in str(caught.value)
    # The same range in a request built by hand is refused by check_request too.
    name, entry = next(iter(space.items()))
    kind = "IntegerParameterRanges" if name == "epochs" else "ContinuousParameterRanges"
    request = tune_request({"augment": [True, False]})
    request["HyperParameterTuningJobConfig"]["ParameterRanges"][kind] = [
        {"Name": name, "MinValue": str(entry["min"]), "MaxValue": str(entry["max"]),
         "ScalingType": entry["scaling"]}]
    with pytest.raises(UserInputError, match=re.escape(words)):
        check_request("CreateHyperParameterTuningJob", request)


def test_reverse_logarithmic_within_its_domain_is_sent():
    request = tune_request({"ema_decay": {"min": 0.9, "max": 0.9999, "scaling": "ReverseLogarithmic"}})
    check_request("CreateHyperParameterTuningJob", request)
    assert request["HyperParameterTuningJobConfig"]["ParameterRanges"]["ContinuousParameterRanges"] == [
        {"Name": "ema_decay", "MinValue": "0.9", "MaxValue": "0.9999", "ScalingType": "ReverseLogarithmic"}]


@pytest.mark.parametrize("extra, ranges, words", [
    (["--strategy", "Grid"], None, "the Grid strategy searches categorical values only"),
    (["--strategy", "Hyperband", "--early-stopping", "Auto"], None, "TrainingJobEarlyStoppingType Off"),
    ([], {"learning_rate": {"min": 0.001, "max": 5, "scaling": "ReverseLogarithmic"}}, "within [0, 1)"),
    (["--set", "val_fraction=0"], None, "no trial could be scored"),
    (["--input-mode", "Pipe"], None, "--input-mode Pipe streams only augmented manifests"),
    (["--image", IMAGE.replace(":pushed1", ":abc1234")], None, "was never pushed"),
])
def test_emulated_tune_refuses_before_any_upload_or_job(clients, shapes, capsys, tmp_path, extra, ranges, words):
    if ranges is not None:
        (tmp_path / "r.json").write_text(json.dumps(ranges))
        extra = [*extra, "--ranges", str(tmp_path / "r.json")]
    err = refused(capsys, "tune", *job_args(shapes, *extra))
    assert words in err
    nothing_created(clients)


def test_emulated_tune_hyperband_is_created_with_what_it_requires(clients, shapes):
    done = sm_effdet("tune", *job_args(shapes, "--strategy", "Hyperband", "--name", "hb-1",
                                       "--max-jobs", "4", "--no-wait"))
    assert done.returncode == 0, done.stderr
    got = clients["sagemaker"].describe_hyper_parameter_tuning_job(HyperParameterTuningJobName="hb-1")
    config = got["HyperParameterTuningJobConfig"]
    assert config["Strategy"] == "Hyperband" and config["TrainingJobEarlyStoppingType"] == "Off"
    assert config["StrategyConfig"]["HyperbandStrategyConfig"]["MaxResource"] == 1  # epochs=1
    uri = got["TrainingJobDefinition"]["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"]
    assert held(clients["s3"], uri) == folder_files(shapes)


def test_tune_on_s3_data_without_a_validation_split_says_it_was_not_checked(tmp_path):
    done = sm_effdet("tune", "--dry-run", "--data", "s3://bkt/data/", "--role", ROLE,
                     "--bucket", "bkt", "--set", "val_fraction=0", env=no_aws_env(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "trials print validation:mAP only if the data on S3 carries its own split" in done.stderr
    assert "was not checked in ECR (--dry-run calls nothing)" in done.stderr


# ---------------------------------------------------------------- 5, 7, 12: flags


def no_aws_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_REGION="us-east-1", AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_EC2_METADATA_DISABLED="true")
    return env


def test_pipe_is_refused_for_folders_in_train_and_tune_and_kept_for_augmented_manifests(offline, capsys, tmp_path):
    for command in ("train", "tune"):
        err = refused(capsys, command, "--dry-run", "--data", "s3://bkt/data/", "--role", ROLE,
                      "--bucket", "bkt", "--input-mode", "Pipe")
        assert "the 'training' channel is a folder of files" in err and "FastFile" in err
    manifest = ["--data", "s3://bkt/train.manifest", "--augmented-manifest",
                "source-ref,boxes,boxes-metadata", "--input-mode", "Pipe"]
    err = refused(capsys, "train", "--dry-run", *manifest, "--pretrained", "s3://bkt/weights/",
                  "--role", ROLE, "--bucket", "bkt")
    assert "the 'pretrained' channel is a folder of files" in err
    done = sm_effdet("train", "--dry-run", *manifest, "--role", ROLE, "--bucket", "bkt",
                     env=no_aws_env(tmp_path))
    assert done.returncode == 0, done.stderr
    request = json.loads(done.stdout)
    check_request("CreateTrainingJob", request)
    assert request["AlgorithmSpecification"]["TrainingInputMode"] == "Pipe"


@pytest.mark.parametrize("bucket, words", [
    ("s3://my-bucket", "--bucket takes a bucket's name, not the URI 's3://my-bucket'; pass --bucket my-bucket."),
    ("s3://my-bucket/sub/", "pass --bucket my-bucket --prefix sub."),
    ("has space", "'has space' is not an S3 bucket name"),
    ("my-bucket/sub", "pass the bucket alone (--bucket my-bucket) and the folder with --prefix sub."),
    ("My_Bucket", "is not an S3 bucket name"),
])
def test_emulated_a_bad_bucket_is_one_sentence_before_the_data_check(clients, capsys, tmp_path, bucket, words):
    # A folder the data check would refuse: the bucket's sentence comes first.
    (tmp_path / "empty").mkdir()
    for dry in ([], ["--dry-run"]):
        err = refused(capsys, "train", "--data", str(tmp_path / "empty"), "--role", ROLE,
                      "--bucket", bucket, *dry)
        assert words in err and "s3://s3://" not in err
    nothing_created(clients)


@pytest.mark.parametrize("extra, words", [
    (["--tag", "aws:team=vision"], "keys starting with 'aws:' are reserved"),
    (["--max-run", "3000000"], "is 3000000, over the 28 days (2419200 s)"),
])
def test_emulated_reserved_tags_and_runs_over_28_days_are_refused(clients, shapes, capsys, extra, words):
    err = refused(capsys, "train", *job_args(shapes, *extra))
    assert words in err
    nothing_created(clients)


def test_the_derived_spot_wait_stays_within_28_days_and_reserved_tags_fail_the_check():
    request = training_request(max_run=2_000_000)
    check_request("CreateTrainingJob", request)
    assert request["StoppingCondition"] == {"MaxRuntimeInSeconds": 2_000_000,
                                            "MaxWaitTimeInSeconds": 28 * 24 * 3600}
    assert training_request(max_run=3600)["StoppingCondition"]["MaxWaitTimeInSeconds"] == 7200
    with pytest.raises(UserInputError, match="AWS reserves for its own tags"):
        check_request("CreateTrainingJob", training_request(tags={"AWS:cost": "x"}))


# ---------------------------------------------------------------- 13: the image is in ECR


def test_emulated_an_unpushed_image_is_refused_before_the_upload_and_a_pushed_one_is_used(clients, shapes, capsys):
    unpushed = IMAGE.replace(":pushed1", ":abc1234")
    err = refused(capsys, "train", *job_args(shapes, "--image", unpushed, "--name", "j-1", "--no-wait"))
    assert f"the image {unpushed} was never pushed" in err and "make push" in err
    err = refused(capsys, "train", *job_args(shapes, "--image", unpushed.replace("/sm-effdet:", "/other:"),
                                             "--no-wait"))
    assert "has no ECR repository 'other' in us-east-1" in err
    # The default image (the checkout's commit) is checked the same way.
    default = default_image("123456789012", "us-east-1")
    err = refused(capsys, "train", "--data", str(shapes), "--role", ROLE, "--bucket", BUCKET, "--no-wait")
    assert f"the image {default} was never pushed" in err
    nothing_created(clients)

    done = sm_effdet("train", *job_args(shapes, "--name", "j-1", "--no-wait"))
    assert done.returncode == 0, done.stderr
    assert f"image {IMAGE}: in ECR, pushed " in done.stdout
    sent = clients["sagemaker"].describe_training_job(TrainingJobName="j-1")
    assert sent["AlgorithmSpecification"]["TrainingImage"] == IMAGE


def test_an_image_ecr_cannot_be_asked_about_is_said_to_be_unchecked():
    from botocore.config import Config

    out = io.StringIO()
    # A real client whose endpoint refuses connections (loopback, port 9): ECR cannot answer.
    dead = lambda region: boto3.client(  # noqa: E731
        "ecr", region_name=region, endpoint_url="http://127.0.0.1:9",
        aws_access_key_id="x", aws_secret_access_key="x",
        config=Config(retries={"total_max_attempts": 1}, connect_timeout=2))
    assert check_image_pushed(IMAGE, dead, out=out) is False
    assert f"note: the image {IMAGE} was not checked in ECR" in out.getvalue()
    out = io.StringIO()
    assert check_image_pushed(IMAGE, None, out=out) is False
    assert "was not checked in ECR (no ECR client here)" in out.getvalue()


# ---------------------------------------------------------------- 16: help and messages


def test_help_says_what_each_command_does_with_name_and_has_no_flag_tune_refuses(capsys):
    with pytest.raises(SystemExit):
        main(["tune", "--help"])
    text = capsys.readouterr().out
    printed = " ".join(text.split())
    assert "--name NAME the tuning job's name, at most 32 characters" in printed
    assert "[--local]" not in printed and not re.search(r"^\s+--local\b", text, re.M)
    assert "--instance-count N instances per job" in printed
    parser = build_parser()
    helps = {}
    for command in ("train", "tune"):
        sub = parser._subparsers._group_actions[0].choices[command]
        helps[command] = {a.dest: a.help for a in sub._actions}
    assert "tuning job's name" in helps["tune"]["name"] and "32" in helps["tune"]["name"]
    assert "training job's name" in helps["train"]["name"]
    assert "local" not in helps["tune"] and "local" in helps["train"]
    assert helps["train"]["instance_count"] and helps["tune"]["instance_count"]
    assert all(text for text in helps["train"].values()), [k for k, v in helps["train"].items() if not v]


def test_data_that_is_a_file_is_named_as_a_file(offline, capsys, tmp_path):
    afile = tmp_path / "afile.json"
    afile.write_text("{}")
    err = refused(capsys, "train", "--dry-run", "--data", str(afile), "--role", ROLE, "--bucket", "bkt",
                  "--image", IMAGE)
    assert f"--data {afile} is a file; give the folder that holds it ({tmp_path})" in err
    assert "does not exist" not in err


def test_a_refused_symlinked_images_folder_points_at_the_local_checks_report(offline, capsys, tmp_path):
    data = tmp_path / "data"
    make_shapes_dataset(data, n_images=3, size=(96, 64))
    (data / "images").rename(tmp_path / "elsewhere")
    (data / "images").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    err = refused(capsys, "train", "--dry-run", "--data", str(data), "--role", ROLE, "--bucket", "bkt",
                  "--image", IMAGE)
    assert "output/data/" not in err
    report = Path(re.search(r"the local check's report (\S+\.json)", err)[1])
    written = json.loads(report.read_text())
    assert written["counts"]["image_skipped_unsafe_file_name"] == 3
    report.unlink()


# ---------------------------------------------------------------- 21: enterprise settings


def test_enterprise_settings_reach_the_request_and_pass_the_model(tmp_path, shapes):
    key = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    flags = ["--dry-run", "--data", str(shapes), "--role", ROLE, "--bucket", "bkt",
             "--output-kms-key", "alias/models", "--volume-kms-key", key,
             "--instance-type", "ml.m5.xlarge", "--output-path", "s3://secure-bkt/models",
             "--checkpoint-s3-uri", "s3://secure-bkt/ckpt/run-7", "--no-spot",
             "--keep-alive-period", "1800", "--name", "ent-1"]
    done = sm_effdet("train", *flags, env=no_aws_env(tmp_path))
    assert done.returncode == 0, done.stderr
    request = json.loads(done.stdout)
    check_request("CreateTrainingJob", request)
    assert request["OutputDataConfig"] == {"S3OutputPath": "s3://secure-bkt/models", "KmsKeyId": "alias/models"}
    assert request["ResourceConfig"]["VolumeKmsKeyId"] == key
    assert request["ResourceConfig"]["KeepAlivePeriodInSeconds"] == 1800
    assert request["CheckpointConfig"]["S3Uri"] == "s3://secure-bkt/ckpt/run-7"

    done = sm_effdet("tune", *flags[:-2], "--name", "ent-t", env=no_aws_env(tmp_path))
    assert done.returncode == 0, done.stderr
    tune = json.loads(done.stdout[done.stdout.index("{"):])
    check_request("CreateHyperParameterTuningJob", tune)
    definition = tune["TrainingJobDefinition"]
    assert definition["OutputDataConfig"]["KmsKeyId"] == "alias/models"
    assert definition["ResourceConfig"]["VolumeKmsKeyId"] == key


@pytest.mark.parametrize("extra, words", [
    (["--keep-alive-period", "600"], "cannot be used with managed spot training; add --no-spot"),
    (["--no-spot", "--keep-alive-period", "30000"], "KeepAlivePeriodInSeconds is 30000, at most 21600"),
    (["--volume-kms-key", "1234abcd-12ab-34cd-56ef-1234567890ab"],
     "ml.g5.xlarge keeps its data on local NVMe storage"),
    (["--output-kms-key", "my key"], "KmsKeyId is 'my key', which does not match"),
    (["--output-path", "secure-bkt/models"], "--output-path 'secure-bkt/models' is not an s3:// URI"),
    (["--checkpoint-s3-uri", "s3://Bad_Bucket/x"], "does not start with a valid bucket name"),
])
def test_emulated_enterprise_settings_aws_would_refuse_are_refused_before_upload(clients, shapes, capsys, extra, words):
    err = refused(capsys, "train", *job_args(shapes, *extra))
    assert words in err
    nothing_created(clients)


def test_emulated_an_output_path_in_a_missing_bucket_is_refused_before_the_upload(clients, shapes, capsys):
    err = refused(capsys, "train", *job_args(shapes, "--output-path", "s3://no-such-output-bucket/m"))
    assert "the bucket 'no-such-output-bucket' does not exist" in err
    nothing_created(clients)


def test_the_checks_import_no_torch():
    code = ("import sys, sm_effdet.launch.checks, sm_effdet.launch.images, "
            "sm_effdet.launch.search_space, sm_effdet.launch.upload, sm_effdet.launch.tuning; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lightning')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"

