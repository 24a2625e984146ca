"""The Airflow DAG (pipelines/airflow/dags/) under Airflow 3 (pipelines/airflow) and Airflow 2.10
(pipelines/airflow2, as on Amazon MWAA), each from its lock: installed as the README says
(pipelines/airflow/copy-dags.sh into a dags folder; nothing else on the path),
imported by DagBag with no errors, and run with dag.test() against the AWS emulator.

Every AWS request of a run goes through a recording proxy (tests/aws_proxy.py): the connection
`aws_default` (AIRFLOW_CONN_AWS_DEFAULT) is the only way to the emulator and holds the only
credentials, so a task that used boto3's default chain would fail; the proxy shows who signed
each request (the role the connection assumes), in which region, and which waits ran in the
triggerer (aiobotocore). Emulated: moto's SageMaker completes a job at once and writes nothing to
S3, so the proxy answers a job's first describes with InProgress and the test puts the
model.tar.gz a job would write where the job's ModelArtifacts say; the test asserts what the
DAG sent and decided, never the made-up job results.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path
from types import SimpleNamespace

import boto3
import pytest
from aws_proxy import RecordingProxy
from conftest import NETGUARD, push_image
from pipeline_envs import AIRFLOW_PROJECTS, airflow_python

from sm_effdet.demo import make_shapes_dataset

DAGS = AIRFLOW_PROJECTS["3"] / "dags"
DAG_FILE = DAGS / "sm_effdet_dag.py"
RUNNER = Path(__file__).resolve().parent / "airflow_dag_runner.py"
DAG_ID = "sm_effdet_train_gate_deploy"
REGION = "eu-west-2"
ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"
CONNECTION_ROLE = "arn:aws:iam::123456789012:role/airflow-sagemaker"
CONNECTION_KEY = "AKIAAIRFLOWCONNECTION"
IMAGE = f"123456789012.dkr.ecr.{REGION}.amazonaws.com/sm-effdet:test"
BUCKET = "sm-effdet-airflow-test"
ENDPOINT = "sm-effdet-airflow"
# Describes of a training job the proxy answers InProgress. The operator describes the job
# twice before it defers (the log, the status), so the trigger sees it running twice more; a
# wait in the worker tailing the log describes at most every 30 s (the provider's rule), so
# the runs that wait there see the job running once or not at all.
HOLD = 4


@pytest.fixture(scope="module", params=["3", "2"], ids=["airflow3", "airflow2"])
def airflow(request, tmp_path_factory):
    """An Airflow version's Python, a home with its database made, and a dags folder set up as
    the README says (pipelines/airflow/copy-dags.sh: the DAG, its .airflowignore rule, a copy of
    src/sm_effdet with metric_definitions.json)."""
    version = request.param
    python = airflow_python(version)
    home = tmp_path_factory.mktemp(f"airflow{version}-home")
    dags = home / "dags"
    subprocess.run([str(AIRFLOW_PROJECTS["3"] / "copy-dags.sh"), str(dags)], check=True,
                   capture_output=True, timeout=120)
    found = SimpleNamespace(version=version, python=python, home=home, dags=dags)
    subprocess.run([str(python), "-m", "airflow", "db", "migrate"], env=airflow_env(found),
                   check=True, capture_output=True, timeout=900)
    return found


def airflow_env(airflow, **extra: str) -> dict[str, str]:
    """No AWS settings at all: the connection a run defines is the only way to AWS. Only the
    network guard on PYTHONPATH: sm_effdet comes from the dags folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AIRFLOW"))}
    env.update(
        PYTHONPATH=str(NETGUARD),
        AIRFLOW_HOME=str(airflow.home),
        AIRFLOW__CORE__DAGS_FOLDER=str(airflow.dags),
        AIRFLOW__CORE__LOAD_EXAMPLES="false",
        # Airflow's default asks DNS for this machine's full name; the tests stay on loopback.
        AIRFLOW__CORE__HOSTNAME_CALLABLE="socket.gethostname",
        AWS_CONFIG_FILE=str(airflow.home / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(airflow.home / "no-aws-credentials"),
        AWS_EC2_METADATA_DISABLED="true",
        SM_EFFDET_CHECK_INTERVAL="1",
        SM_EFFDET_PRINT_LOG="true",  # the job log tailed too (the CloudWatch Logs hook)
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


def run_plan(airflow, tmp_path: Path, plan: dict, timeout: int = 800) -> str:
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan))
    done = subprocess.run([str(airflow.python), str(RUNNER), str(plan_file)],
                          env=airflow_env(airflow), capture_output=True, text=True,
                          timeout=timeout, cwd=tmp_path)
    log = done.stdout + done.stderr
    (tmp_path / "runner.log").write_text(log)  # the whole of it, to read after a failure
    assert done.returncode == 0, log[-4000:]
    return log


def dagbag_line(log: str, folder: Path) -> tuple[dict, dict]:
    line = next(x for x in log.splitlines() if x.startswith(f"DAGBAG {folder} "))
    errors, tasks = line[len(f"DAGBAG {folder} "):].split("} {", 1)
    return json.loads(errors + "}"), json.loads("{" + tasks)


def test_the_documented_install_imports_with_no_errors(airflow, tmp_path):
    bare = tmp_path / "dags-without-airflowignore"  # what the README's copy gave before
    shutil.copytree(airflow.dags, bare, ignore=shutil.ignore_patterns(".airflowignore"))
    log = run_plan(airflow, tmp_path, {"dagbags": [str(airflow.dags), str(DAGS), str(bare)]})

    for folder in (airflow.dags, DAGS):  # the copied install, and the checkout's folder
        errors, tasks = dagbag_line(log, folder)
        assert errors == {}, (folder, errors)
        assert sorted(tasks) == [DAG_ID]
        assert tasks[DAG_ID] == sorted(["prepare", "train", "quality_gate", "choose",
                                        "endpoint_requests", "deploy", "transform_requests",
                                        "transform"])
    # Without the ignore file Airflow's safe mode parses the package's modules that name both
    # words, and importing one alone fails: the .airflowignore is what the install needs.
    errors, _ = dagbag_line(log, bare)
    assert "sm_effdet/launch/request.py" in errors


def model_tar_gz(valid_map: float) -> bytes:
    card = {"backbone": "tf_lite0", "metrics": {"valid_map": valid_map}, "best_epoch": 1}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        data = json.dumps(card).encode()
        info = tarfile.TarInfo("model.json")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def connection(proxy_url: str, region: str | None) -> str:
    """AIRFLOW_CONN_AWS_DEFAULT: keys, a role to assume, the emulator behind the proxy, and
    perhaps a region."""
    extra = {"endpoint_url": proxy_url, "role_arn": CONNECTION_ROLE,
             # The provider never sends the role's AssumeRole to the global endpoint_url.
             "service_config": {"sts": {"endpoint_url": proxy_url}}}
    if region:
        extra["region_name"] = region
    return json.dumps({"conn_type": "aws", "login": CONNECTION_KEY, "password": "secret",
                       "extra": extra})


def train_args(data: Path, job: str, *more: str) -> list[str]:
    return ["--data", str(data), "--role", ROLE, "--image", IMAGE, "--bucket", BUCKET,
            "--name", job, "--set", "epochs=2", "--set", "img_size=384", *more]


def signed_by_the_role(calls, issued: set[str]) -> None:
    """Every request was signed by the role the connection assumes, in the run's region; only
    the AssumeRole calls themselves by the connection's own keys."""
    assumed = [c for c in calls if c.operation == "query:AssumeRole"]
    others = [c for c in calls if c.operation != "query:AssumeRole"]
    assert assumed and {c.key for c in assumed} == {CONNECTION_KEY}
    assert others and {c.key for c in others} <= issued, {c.key for c in others} - issued
    assert {c.region for c in others} == {REGION}


def ops(calls, operation: str, by: str | None = None):
    return [c for c in calls if c.operation == operation and (by is None or by in c.agent)]


def test_emulated_runs_one_connection_deferred_waits_and_retries(airflow, aws, tmp_path):
    s3 = boto3.client("s3", region_name=REGION)
    sagemaker = boto3.client("sagemaker", region_name=REGION)
    s3.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
    push_image(IMAGE)  # prepare checks the image in ECR, through the connection, as train does
    # A COCO JSON without sizes: `prepare` reads the image headers (Pillow) on the worker.
    data = tmp_path / "shapes" / "training"
    coco = make_shapes_dataset(data, n_images=6)
    for image in coco["images"]:
        del image["width"], image["height"]
    (data / "annotations.json").write_text(json.dumps(coco))
    good, worse = "sm-effdet-airflow-good", "sm-effdet-airflow-worse"
    # Where the jobs' ModelArtifacts point (the launcher's output path, then <job>/output/).
    for job, valid_map in ((good, 0.42), (worse, 0.35)):
        s3.put_object(Bucket=BUCKET, Key=f"sm-effdet/jobs/{job}/output/model.tar.gz",
                      Body=model_tar_gz(valid_map))

    region_only_hold = 3 if airflow.version == "3" else 0  # deferred on 3, in the worker on 2
    with RecordingProxy(aws) as proxy:
        with_region = connection(proxy.url, REGION)
        without_region = connection(proxy.url, None)
        first = {"train_args": train_args(data, good), "min_map": 0.3, "endpoint": ENDPOINT}
        runs = [
            # The connection names the region; waits deferred (the default).
            {"name": "deferred", "conf": first, "hold": HOLD,
             "env": {"AIRFLOW_CONN_AWS_DEFAULT": with_region}},
            # Only AWS_REGION names it: every task and the trigger must still use it.
            {"name": "aws-region-only",
             "conf": {"train_args": train_args(data, worse), "min_map": 0.3,
                      "endpoint": ENDPOINT}, "hold": region_only_hold,
             "env": {"AIRFLOW_CONN_AWS_DEFAULT": without_region, "AWS_REGION": REGION}},
            # The first run's train task again (a retry after a lost worker): its job exists.
            {"name": "retry", "conf": {**first, "endpoint": "", "deferrable": False}, "hold": 1,
             "env": {"AIRFLOW_CONN_AWS_DEFAULT": with_region, "AWS_REGION": None}},
            # The same name with another request: not the job this run would start.
            {"name": "same-name-other-job",
             "conf": {**first, "train_args": train_args(data, good, "--set", "epochs=3")},
             "env": {}},
        ]
        log = run_plan(airflow, tmp_path, {"dag_file": str(airflow.dags / "sm_effdet_dag.py"),
                                            "proxy": proxy.url, "runs": runs})
        part = {r["name"]: proxy.recorder.in_part(r["name"]) for r in runs}
        issued = set(proxy.recorder.issued_keys)
    logs = dict(zip([r["name"] for r in runs], log.split("=== run ")[1:]))

    # 1. Deferred: trained, gated, deployed; the trigger (aiobotocore) waited for the job.
    calls = part["deferred"]
    assert "RUN deferred success" in log, logs["deferred"][-4000:]
    assert "quality gate: validation mAP 0.4200 reaches the threshold 0.3000" in logs["deferred"]
    signed_by_the_role(calls, issued)
    assert len(ops(calls, "SageMaker.CreateTrainingJob")) == 1
    # The trigger polled while the job ran, then saw it complete.
    assert len(ops(calls, "SageMaker.DescribeTrainingJob", by="aiobotocore")) >= 2
    uploads = [c for c in calls if c.operation.startswith(f"PUT /{BUCKET}/")]
    assert any(c.operation.endswith("/annotations.json") for c in uploads)  # by `prepare`
    assert ops(calls, f"GET /{BUCKET}/sm-effdet/jobs/{good}/output/model.tar.gz")  # the gate
    described = sagemaker.describe_training_job(TrainingJobName=good)
    assert described["HyperParameters"]["epochs"] == "2"
    assert described["HyperParameters"]["img_size"] == "384"
    assert described["AlgorithmSpecification"]["TrainingImage"] == IMAGE
    channel = described["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"]
    bucket, prefix = channel[5:].split("/", 1)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]]
    assert bucket == BUCKET and any(k.endswith("annotations.json") for k in keys)
    assert serving(sagemaker) == f"s3://{BUCKET}/sm-effdet/jobs/{good}/output/model.tar.gz"

    # 2. Region from AWS_REGION alone: every request in it; the worse model is not deployed.
    calls = part["aws-region-only"]
    assert "RUN aws-region-only success" in log, logs["aws-region-only"][-4000:]
    assert "below the deployed model's 0.4200: not deployed" in logs["aws-region-only"]
    signed_by_the_role(calls, issued)
    waits = ops(calls, "SageMaker.DescribeTrainingJob")
    assert len(waits) > region_only_hold  # it waited for the job to complete
    # The provider's own S3 check of the inputs and its log tailing, in the run's region too.
    assert ops(calls, f"HEAD /{BUCKET}") or ops(calls, f"GET /{BUCKET}")
    assert ops(calls, "Logs_20140328.DescribeLogStreams")
    if airflow.version == "3":  # the provider gives the trigger the region
        assert ops(calls, "SageMaker.DescribeTrainingJob", by="aiobotocore")
    else:  # Airflow 2.10's provider cannot: the worker waits, and says why
        assert not ops(calls, "SageMaker.DescribeTrainingJob", by="aiobotocore")
        assert "waiting in the worker, not deferred" in logs["aws-region-only"]
    assert serving(sagemaker).endswith(f"/{good}/output/model.tar.gz")

    # 3. Retry: re-attached to the running job, waited for it in the worker, never re-created.
    calls = part["retry"]
    assert "RUN retry success" in log, logs["retry"][-4000:]
    assert f"re-attaching to the training job {good} (InProgress)" in logs["retry"]
    assert not ops(calls, "SageMaker.CreateTrainingJob")
    assert len(ops(calls, "SageMaker.DescribeTrainingJob")) > 1
    assert not ops(calls, "SageMaker.DescribeTrainingJob", by="aiobotocore")
    assert "quality gate: validation mAP 0.4200" in logs["retry"]

    # 4. The name of an existing job with another request: one sentence, nothing created.
    calls = part["same-name-other-job"]
    assert "RUN same-name-other-job failed" in log
    assert (f"a SageMaker training job named {good} already exists and differs from this "
            "run's request in its hyperparameters;") in logs["same-name-other-job"]
    assert not ops(calls, "SageMaker.CreateTrainingJob")
    assert len(sagemaker.list_training_jobs()["TrainingJobSummaries"]) == 2


def serving(sagemaker) -> str:
    endpoint = sagemaker.describe_endpoint(EndpointName=ENDPOINT)
    config = sagemaker.describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
    model = sagemaker.describe_model(ModelName=config["ProductionVariants"][0]["ModelName"])
    return model["PrimaryContainer"]["ModelDataUrl"]
