"""The Airflow DAG (pipelines/airflow/): imported by Airflow with no errors, and run once with
dag.test() against the AWS emulator. Emulated: moto's SageMaker completes a training job at once
and writes nothing to S3, so the test puts the model.tar.gz a job would write where the job's
ModelArtifacts say, and asserts what the DAG sent (the training request, the endpoint's model)
and what its quality gate decided; never the made-up job results.

The DAG runs in its own environment (Airflow is large and stays out of the image's lock):
`uv sync --frozen --project pipelines/airflow`, done here once per session.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import boto3
import pytest

from sm_effdet.demo import make_shapes_dataset

REPO = Path(__file__).resolve().parents[1]
PIPELINE = REPO / "pipelines" / "airflow"
DAG_FILE = PIPELINE / "dags" / "sm_effdet_dag.py"
ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/sm-effdet:test"
BUCKET = "sm-effdet-airflow-test"


@pytest.fixture(scope="module")
def airflow(tmp_path_factory):
    """The pipeline's Python and an Airflow home with its database made."""
    uv = shutil.which("uv") or f"{sys.executable} -m uv"
    subprocess.run(f"{uv} sync --frozen --quiet --project {PIPELINE}", shell=True, check=True,
                   timeout=900)
    python = PIPELINE / ".venv" / "bin" / "python"
    home = tmp_path_factory.mktemp("airflow-home")
    env = airflow_env(home)
    subprocess.run([str(python), "-m", "airflow", "db", "migrate"], env=env, check=True,
                   capture_output=True, timeout=600)
    return python, home


def airflow_env(home: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAG_FILE.parent),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "false",
        # Airflow's default asks DNS for this machine's full name; the tests stay on loopback.
        "AIRFLOW__CORE__HOSTNAME_CALLABLE": "socket.gethostname",
        "SM_EFFDET_CHECK_INTERVAL": "1",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def test_airflow_imports_the_dag_without_errors(airflow):
    python, home = airflow
    script = (
        "from airflow.dag_processing.dagbag import DagBag\n"
        f"bag = DagBag(dag_folder={str(DAG_FILE)!r})\n"
        "print('errors', bag.import_errors)\n"
        "dag = bag.get_dag('sm_effdet_train_gate_deploy')\n"
        "print('tasks', sorted(t.task_id for t in dag.tasks))\n"
    )
    out = subprocess.run([str(python), "-c", script], env=airflow_env(home), capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "errors {}" in out.stdout, out.stdout
    tasks = out.stdout.split("tasks ", 1)[1]
    for task_id in ("prepare", "train", "quality_gate", "choose", "endpoint_requests", "deploy",
                    "transform_requests", "transform"):
        assert f"'{task_id}'" in tasks


def model_tar_gz(valid_map: float) -> bytes:
    card = {"backbone": "tf_lite0", "metrics": {"valid_map": valid_map}, "best_epoch": 1}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        data = json.dumps(card).encode()
        info = tarfile.TarInfo("model.json")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def run_dag(airflow, tmp_path: Path, conf: dict) -> subprocess.CompletedProcess:
    python, home = airflow
    conf_file = tmp_path / "conf.json"
    conf_file.write_text(json.dumps(conf))
    return subprocess.run(
        [str(python), str(DAG_FILE), str(conf_file)],
        env=airflow_env(home, SM_EFFDET_PRINT_LOG="false"), capture_output=True, text=True,
        timeout=900, cwd=tmp_path,
    )


def test_emulated_dag_run_trains_gates_and_deploys(airflow, aws, tmp_path):
    s3 = boto3.client("s3")
    sagemaker = boto3.client("sagemaker")
    s3.create_bucket(Bucket=BUCKET)
    data = tmp_path / "shapes" / "training"
    make_shapes_dataset(data, n_images=6)
    job = "sm-effdet-airflow-good"
    # Where the job's ModelArtifacts point (the launcher's output path, then <job>/output/).
    s3.put_object(Bucket=BUCKET, Key=f"sm-effdet/jobs/{job}/output/model.tar.gz",
                  Body=model_tar_gz(0.42))
    train_args = ["--data", str(data), "--role", ROLE, "--image", IMAGE, "--bucket", BUCKET,
                  "--name", job, "--set", "epochs=2", "--set", "img_size=384"]
    out = run_dag(airflow, tmp_path, {"train_args": train_args, "min_map": 0.3,
                                      "endpoint": "sm-effdet-airflow"})
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "quality gate: validation mAP 0.4200 reaches the threshold 0.3000" in log

    described = sagemaker.describe_training_job(TrainingJobName=job)
    assert described["HyperParameters"]["epochs"] == "2"
    assert described["HyperParameters"]["img_size"] == "384"
    assert described["AlgorithmSpecification"]["TrainingImage"] == IMAGE
    # The data went through the launcher's upload, into the bucket the request names.
    channel = described["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"]
    assert channel.startswith(f"s3://{BUCKET}/")
    bucket, prefix = channel[5:].split("/", 1)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]]
    assert any(k.endswith("annotations.json") for k in keys)

    endpoint = sagemaker.describe_endpoint(EndpointName="sm-effdet-airflow")
    config = sagemaker.describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
    model = sagemaker.describe_model(ModelName=config["ProductionVariants"][0]["ModelName"])
    assert model["PrimaryContainer"]["ModelDataUrl"] == (
        f"s3://{BUCKET}/sm-effdet/jobs/{job}/output/model.tar.gz"
    )
    assert model["PrimaryContainer"]["Image"] == IMAGE

    # A second model below the deployed one's mAP: trained, gated, not deployed.
    worse = "sm-effdet-airflow-worse"
    s3.put_object(Bucket=BUCKET, Key=f"sm-effdet/jobs/{worse}/output/model.tar.gz",
                  Body=model_tar_gz(0.35))
    train_args[train_args.index(job)] = worse
    out = run_dag(airflow, tmp_path, {"train_args": train_args, "min_map": 0.3,
                                      "endpoint": "sm-effdet-airflow"})
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "below the deployed model's 0.4200: not deployed" in log
    endpoint = sagemaker.describe_endpoint(EndpointName="sm-effdet-airflow")
    config = sagemaker.describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
    model = sagemaker.describe_model(ModelName=config["ProductionVariants"][0]["ModelName"])
    assert job in model["PrimaryContainer"]["ModelDataUrl"]
