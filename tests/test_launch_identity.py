"""Role and bucket the SDK way, and unknown names in AWS's words (launch/identity.py, aws.py):
a role NAME or a session's assumed-role ARN resolved with IAM GetRole, the credentials' role
when no --role is given, the account from STS, the default bucket created when missing with its
ownership check; not-found answers naming the resource and the region.

What is real and what is emulated (as in tests/test_launch_lifecycle.py): tests named
`test_emulated_*` run against moto's server on 127.0.0.1, whose IAM, STS (assumed-role sessions
included) and S3 are faithful enough here, but whose S3 ignores ExpectedBucketOwner. Real AWS's
own wordings and refusals moto does not give (not-found messages, 403 on ExpectedBucketOwner,
BucketAlreadyExists) come from botocore's Stubber: botocore's parser and error shapes, no network.
"""

from __future__ import annotations

import io
import json
import os

import boto3
import pytest
from botocore.config import Config
from test_launch_hosting import BUCKET, IMAGE, ROLE, one_sentence, text_sample
from test_launch_lifecycle import ACCOUNT, SAGEMAKER_TRUST, nothing_created, parsed, stubbed

from sm_effdet.errors import JobError, UserInputError
from sm_effdet.launch import aws as launch_aws
from sm_effdet.launch import identity
from sm_effdet.launch.cli import main
from sm_effdet.launch.validation import check_request


@pytest.fixture
def clients(aws):
    # One attempt: a refusal the test provokes is not retried for seconds.
    config = Config(retries={"mode": "standard", "total_max_attempts": 1})
    made = {name: boto3.client(name, config=config) for name in ("sagemaker", "s3", "iam", "sts")}
    made["s3"].create_bucket(Bucket=BUCKET)
    return made


# --- 9: an unknown name, in real AWS's words and in moto's ------------------------------

REAL_NOT_FOUND = [
    ("sagemaker", "describe_training_job", {"TrainingJobName": "nope"}, "ValidationException",
     "Requested resource not found."),
    ("sagemaker", "describe_endpoint", {"EndpointName": "nope"}, "ValidationException",
     'Could not find endpoint "arn:aws:sagemaker:eu-west-1:123456789012:endpoint/nope".'),
    ("sagemaker", "delete_model", {"ModelName": "nope"}, "ValidationException",
     'Could not find model "arn:aws:sagemaker:eu-west-1:123456789012:model/nope".'),
    ("sagemaker", "describe_hyper_parameter_tuning_job", {"HyperParameterTuningJobName": "nope"},
     "ResourceNotFound", "Amazon SageMaker can't find a tuning job with name nope"),
    ("sagemaker-runtime", "invoke_endpoint", {"EndpointName": "nope", "Body": b"x"}, "ValidationError",
     "Endpoint nope of account 123456789012 not found."),
    ("logs", "describe_log_streams", {"logGroupName": "/aws/sagemaker/TrainingJobs"},
     "ResourceNotFoundException", "The specified log group does not exist."),
    ("iam", "get_role", {"RoleName": "nope"}, "NoSuchEntity", "The role with name nope cannot be found."),
]


@pytest.mark.parametrize("service, method, params, code, message", REAL_NOT_FOUND)
def test_real_aws_not_found_answers_are_recognised_and_name_the_resource_and_region(
        service, method, params, code, message):
    made, stub = stubbed(service)
    stub.add_client_error(method, service_error_code=code, service_message=message, http_status_code=400)
    with stub, pytest.raises(JobError) as exc:
        with launch_aws.named("thing", "nope", "eu-west-1", "sm-effdet endpoints"):
            getattr(made, method)(**params)
    assert str(exc.value) == (
        "there is no thing named nope in region eu-west-1; check the name and the region "
        "(AWS_REGION, or your profile's region), or list them with `sm-effdet endpoints`.")


@pytest.mark.parametrize("code, message", [
    ("ValidationException", "1 validation error detected: Value 'x_y' at 'trainingJobName' failed to "
     "satisfy constraint: Member must satisfy regular expression pattern"),
    ("AccessDeniedException", "User: arn:aws:iam::123456789012:user/me is not authorized to perform: "
     "sagemaker:DescribeTrainingJob"),
    ("ThrottlingException", "Rate exceeded"),
])
def test_other_refusals_are_not_taken_for_a_missing_name(code, message):
    made, stub = stubbed("sagemaker")
    stub.add_client_error("describe_training_job", service_error_code=code, service_message=message)
    with stub, pytest.raises(Exception) as exc:
        with launch_aws.named("training job", "x_y", "eu-west-1"):
            made.describe_training_job(TrainingJobName="x_y")
    assert not isinstance(exc.value, JobError) and not launch_aws.is_not_found(exc.value)


def test_deploy_of_an_unknown_job_in_real_aws_words_names_it_and_the_region():
    sagemaker, stub = stubbed("sagemaker")
    stub.add_client_error("describe_training_job", service_error_code="ValidationException",
                          service_message="Requested resource not found.",
                          expected_params={"TrainingJobName": "no-such-job"})
    args = parsed("deploy", "no-such-job")
    with stub, pytest.raises(JobError) as exc:
        args.run(args, sagemaker=sagemaker, runtime=object(), s3=object(), out=io.StringIO())
    assert "there is no training job named no-such-job in region eu-west-1" in one_sentence(exc)


@pytest.mark.parametrize("argv, what", [
    (["deploy", "no-such-job"], "training job named no-such-job"),
    (["transform", "no-such-job", "--input", f"s3://{BUCKET}/images/"], "training job named no-such-job"),
    (["delete", "no-such-endpoint"], "endpoint named no-such-endpoint"),
    (["predict", "no-such-endpoint", "IMAGE"], "endpoint named no-such-endpoint"),
])
def test_emulated_unknown_names_in_moto_words_exit_1_with_one_sentence(clients, capsys, tmp_path, argv, what):
    argv = [str(text_sample(tmp_path)) if a == "IMAGE" else a for a in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sm-effdet: there is no ") and what in err, err
    assert "in region us-east-1;" in err
    nothing_created(clients)


# --- 17: role and bucket the SDK way ----------------------------------------------------


def dry_run_request(capsys, *extra: str) -> dict:
    code = main(["train", "--dry-run", "--data", f"s3://{BUCKET}/data/", "--set", "epochs=1", *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def make_role(clients, name: str = "SageMakerRole", trust: dict = SAGEMAKER_TRUST, path: str = "/service-role/") -> str:
    return clients["iam"].create_role(RoleName=name, Path=path, AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]


def test_emulated_a_role_name_resolves_to_its_arn_with_its_path(clients, capsys):
    arn = make_role(clients)
    assert arn == f"arn:aws:iam::{ACCOUNT}:role/service-role/SageMakerRole"
    request = dry_run_request(capsys, "--role", "SageMakerRole", "--bucket", BUCKET)
    assert request["RoleArn"] == arn
    check_request("CreateTrainingJob", request)


def test_emulated_a_studio_sessions_role_is_used_without_role_and_its_arn_resolves(clients, capsys, monkeypatch):
    arn = make_role(clients)
    session = clients["sts"].assume_role(RoleArn=arn, RoleSessionName="SageMaker")
    assumed = session["AssumedRoleUser"]["Arn"]
    assert assumed == f"arn:aws:sts::{ACCOUNT}:assumed-role/SageMakerRole/SageMaker"
    request = dry_run_request(capsys, "--role", assumed, "--bucket", BUCKET)
    assert request["RoleArn"] == arn
    # A notebook's credentials are the session's: with no --role, its role is the job's.
    credentials = session["Credentials"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", credentials["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", credentials["SecretAccessKey"])
    monkeypatch.setenv("AWS_SESSION_TOKEN", credentials["SessionToken"])
    code = main(["train", "--dry-run", "--data", f"s3://{BUCKET}/data/", "--bucket", BUCKET])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out)["RoleArn"] == arn
    assert f"execution role: {arn} (the role of these credentials)" in captured.err


def test_emulated_a_role_sagemaker_cannot_assume_is_refused(clients, capsys):
    ec2_only = {**SAGEMAKER_TRUST, "Statement": [{**SAGEMAKER_TRUST["Statement"][0],
                                                 "Principal": {"Service": "ec2.amazonaws.com"}}]}
    arn = make_role(clients, "Ec2Role", ec2_only, "/")
    assert main(["train", "--dry-run", "--data", f"s3://{BUCKET}/d/", "--role", "Ec2Role", "--bucket", BUCKET]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"the role {arn} does not let SageMaker assume it" in err


def test_emulated_the_account_is_the_callers_not_the_roles(clients, capsys):
    other = "arn:aws:iam::999999999999:role/CrossAccountSageMaker"
    request = dry_run_request(capsys, "--role", other)
    caller = clients["sts"].get_caller_identity()["Account"]
    assert caller == ACCOUNT
    assert request["RoleArn"] == other
    assert request["OutputDataConfig"]["S3OutputPath"].startswith(f"s3://sagemaker-us-east-1-{caller}/")
    assert request["AlgorithmSpecification"]["TrainingImage"].startswith(f"{caller}.dkr.ecr.us-east-1.")


def test_emulated_the_default_bucket_is_created_when_missing_and_used(clients, capsys, tmp_path):
    from sm_effdet.demo import make_shapes_dataset

    make_shapes_dataset(tmp_path / "shapes", n_images=4)
    bucket = f"sagemaker-us-east-1-{ACCOUNT}"
    assert bucket not in [b["Name"] for b in clients["s3"].list_buckets()["Buckets"]]
    code = main(["train", "--data", str(tmp_path / "shapes"), "--role", ROLE, "--image", IMAGE,
                 "--set", "epochs=1", "--name", "default-bucket", "--no-wait"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"created the default bucket s3://{bucket}" in captured.out
    job = clients["sagemaker"].describe_training_job(TrainingJobName="default-bucket")
    uri = job["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"]
    assert uri.startswith(f"s3://{bucket}/")
    keys = [o["Key"] for o in clients["s3"].list_objects_v2(Bucket=bucket)["Contents"]]
    assert len([k for k in keys if k.endswith(".jpg")]) == 4
    # A second launch finds it and creates nothing.
    identity.ensure_default_bucket(clients["s3"], bucket, region="us-east-1", account=ACCOUNT, out=io.StringIO())


def test_a_default_bucket_owned_by_another_account_is_refused():
    s3, stub = stubbed("s3")
    bucket = f"sagemaker-eu-west-1-{ACCOUNT}"
    # What S3 answers HeadBucket with a wrong ExpectedBucketOwner (moto ignores the field).
    stub.add_client_error("head_bucket", service_error_code="403", service_message="Forbidden",
                          http_status_code=403,
                          expected_params={"Bucket": bucket, "ExpectedBucketOwner": ACCOUNT})
    with stub, pytest.raises(UserInputError) as exc:
        identity.ensure_default_bucket(s3, bucket, region="eu-west-1", account=ACCOUNT)
    stub.assert_no_pending_responses()  # and no CreateBucket was tried
    assert f"the default bucket {bucket} exists but is not owned by account {ACCOUNT}" in one_sentence(exc)


def test_a_default_bucket_name_taken_elsewhere_is_refused_and_one_created_outside_us_east_1_has_its_region():
    s3, stub = stubbed("s3")
    bucket = f"sagemaker-eu-west-1-{ACCOUNT}"
    stub.add_client_error("head_bucket", service_error_code="404", service_message="Not Found", http_status_code=404)
    stub.add_client_error("create_bucket", service_error_code="BucketAlreadyExists", http_status_code=409,
                          expected_params={"Bucket": bucket, "CreateBucketConfiguration": {"LocationConstraint": "eu-west-1"}})
    with stub, pytest.raises(UserInputError) as exc:
        identity.ensure_default_bucket(s3, bucket, region="eu-west-1", account=ACCOUNT)
    assert "is taken by another account" in one_sentence(exc)


def test_a_dry_run_without_credentials_needs_a_role_arn(tmp_path, monkeypatch, capsys):
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert main(["train", "--dry-run", "--data", "s3://b/d/", "--role", "SageMakerRole", "--bucket", "b"]) == 2
    assert "a dry run without a role ARN needs AWS credentials" in capsys.readouterr().err
    # A malformed --role is refused for what it is, before any call.
    assert main(["train", "--dry-run", "--data", "s3://b/d/", "--role", "arn:aws:iam::1:user/me"]) == 2
    assert "--role 'arn:aws:iam::1:user/me' is neither an IAM role ARN" in capsys.readouterr().err
