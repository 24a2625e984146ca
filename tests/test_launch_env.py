"""The data check in every light environment that runs it: the launcher's `launch` group
(`make train-job`, `uv run --only-group launch`) and the Airflow projects (the DAG's `prepare`
task, Airflow 3 and 2.10). Each environment is made from its lock exactly (tests/pipeline_envs.py)
and `sm-effdet train --dry-run` checks, in it, the datasets whose check opens image headers: a
YOLO folder and a COCO JSON without sizes. Every module of the launcher and of the data formats
imports there, so a lazy import of a package the environment lacks shows here, not on AWS."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from pipeline_envs import airflow_python, launch_group_python
from test_formats import write_yolo

from sm_effdet.demo import make_shapes_dataset

REPO = Path(__file__).resolve().parents[1]
SM_EFFDET = REPO / "sm-effdet"
ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"


@pytest.fixture(scope="module")
def launch_env(tmp_path_factory) -> Path:
    return launch_group_python(tmp_path_factory.mktemp("launch-group") / "venv")


@pytest.fixture(params=["launch group", "airflow 3", "airflow 2"])
def python(request) -> Path:
    if request.param == "launch group":
        return request.getfixturevalue("launch_env")
    return airflow_python(request.param.split()[1])


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, tuple[Path, int, int]]:
    """name -> (folder, images, boxes), the counts from the files as written."""
    base = tmp_path_factory.mktemp("light-data")
    coco = make_shapes_dataset(base / "coco", n_images=6)
    n_images, n_boxes = len(coco["images"]), len(coco["annotations"])
    write_yolo(coco, base / "coco", base / "yolo")
    for image in coco["images"]:  # sizes left out: the reader opens each image's header
        del image["width"], image["height"]
    (base / "coco" / "annotations.json").write_text(json.dumps(coco))
    yolo_boxes = sum(len(p.read_text().split("\n")) - 1 for p in (base / "yolo").rglob("*.txt"))
    assert yolo_boxes == n_boxes
    return {"yolo": (base / "yolo", n_images, n_boxes),
            "coco without sizes": (base / "coco", n_images, n_boxes)}


def light_env(tmp_path: Path) -> dict[str, str]:
    """No credentials and no profile: a dry run makes no AWS call."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_REGION="eu-west-1", AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true")
    return env


@pytest.mark.parametrize("dataset", ["yolo", "coco without sizes"])
def test_the_data_check_runs_in_each_light_environment(python, datasets, dataset, tmp_path):
    folder, n_images, n_boxes = datasets[dataset]
    done = subprocess.run(
        [str(python), str(SM_EFFDET), "train", "--dry-run", "--data", str(folder), "--role", ROLE,
         "--bucket", "my-bucket", "--name", "light-1"],
        capture_output=True, text=True, env=light_env(tmp_path), timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert f"{n_images} images and {n_boxes} boxes listed" in done.stderr
    request = json.loads(done.stdout)
    assert request["TrainingJobName"] == "light-1"
    assert request["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"].startswith(
        "s3://my-bucket/")


def test_every_launcher_and_format_module_imports_in_each_light_environment(python):
    code = (
        "import importlib, pkgutil, sys\n"
        f"sys.path.insert(0, {str(REPO / 'src')!r})\n"
        "import sm_effdet.launch, sm_effdet.data.formats\n"
        "names = []\n"
        "for package in (sm_effdet.launch, sm_effdet.data.formats):\n"
        "    for found in pkgutil.iter_modules(package.__path__, package.__name__ + '.'):\n"
        "        importlib.import_module(found.name)\n"
        "        names.append(found.name)\n"
        "print(len(names), sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))\n"
    )
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    count, torch = done.stdout.split(" ", 1)
    src = REPO / "src" / "sm_effdet"
    expected = sum(1 for d in ("launch", "data/formats") for p in (src / d).glob("*.py")
                   if p.name != "__init__.py")
    assert int(count) == expected
    assert torch.strip() == "[]"
