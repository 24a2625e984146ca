"""Opt-in, REAL AWS (costs a few cents): `pytest -m aws tests/test_launch_aws.py` runs one real
1-epoch SageMaker training job with `sm-effdet train`, follows it to the end and fetches it.

Skipped unless `-m aws` is given, real credentials are found and these are set:
SM_EFFDET_TEST_ROLE (execution role ARN), SM_EFFDET_TEST_BUCKET (an existing bucket in the
region); optional SM_EFFDET_TEST_IMAGE (default: the URI `make push` printed for this checkout)
and SM_EFFDET_TEST_INSTANCE_TYPE (default ml.m5.xlarge, a CPU instance).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sm_effdet.demo import make_shapes_dataset

pytestmark = pytest.mark.aws

REPO = Path(__file__).resolve().parents[1]
NETGUARD = str(Path(__file__).resolve().parent / "netguard")


def real_aws_env(pytestconfig) -> dict[str, str]:
    if "aws" not in (pytestconfig.getoption("-m") or ""):
        pytest.skip("runs a real SageMaker job: opt in with pytest -m aws")
    missing = [k for k in ("SM_EFFDET_TEST_ROLE", "SM_EFFDET_TEST_BUCKET") if not os.environ.get(k)]
    if missing:
        pytest.skip(f"set {', '.join(missing)} to run a real SageMaker job")
    import boto3

    if boto3.session.Session().get_credentials() is None or os.environ.get("AWS_ENDPOINT_URL"):
        pytest.skip("no real AWS credentials (or AWS_ENDPOINT_URL points at an emulator)")
    # This one test talks to AWS: its processes run without the loopback-only network guard.
    path = os.pathsep.join(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                           if p and p != NETGUARD)
    return {**os.environ, "PYTHONPATH": path}


def test_aws_one_real_epoch_is_followed_and_fetched(pytestconfig, tmp_path):
    env = real_aws_env(pytestconfig)
    data = tmp_path / "shapes"
    make_shapes_dataset(data, n_images=24)
    name = f"sm-effdet-test-{os.getpid()}"
    image = ["--image", os.environ["SM_EFFDET_TEST_IMAGE"]] if os.environ.get("SM_EFFDET_TEST_IMAGE") else []
    train = subprocess.run(
        [sys.executable, str(REPO / "sm-effdet"), "train", "--data", str(data),
         "--role", os.environ["SM_EFFDET_TEST_ROLE"], "--bucket", os.environ["SM_EFFDET_TEST_BUCKET"],
         "--prefix", "sm-effdet-test", "--name", name, *image,
         "--instance-type", os.environ.get("SM_EFFDET_TEST_INSTANCE_TYPE", "ml.m5.xlarge"),
         "--max-run", "3600", "--poll", "20",
         "--set", "epochs=1", "--set", "img_size=256", "--set", "pretrained=false",
         "--set", "export_onnx=false"],
        env=env, capture_output=True, text=True, timeout=2 * 3600,
    )
    print(train.stdout[-5000:], train.stderr[-2000:])
    assert train.returncode == 0, train.stderr
    assert f"training job {name}: Completed" in train.stdout
    # The job's epoch line, read from CloudWatch and tagged by host.
    assert any(l.startswith("[algo-1] ") and "epoch=1/1 " in l for l in train.stdout.splitlines())

    fetched = subprocess.run(
        [sys.executable, str(REPO / "sm-effdet"), "fetch", name, str(tmp_path / "fetched")],
        env=env, capture_output=True, text=True, timeout=1800,
    )
    assert fetched.returncode == 0, fetched.stderr
    assert (tmp_path / "fetched" / "model" / "model.json").is_file()
    assert "best epoch" in fetched.stdout and "report: " in fetched.stdout
