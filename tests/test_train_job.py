"""The job end to end: the real ./train, real effdet, Lightning and Icevision, on generated data."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import FAST, REPO, failure_text, model_files, run_train, write_tree
from PIL import Image

from sm_effdet.training.checkpoints import list_checkpoints
from sm_effdet.training.metrics_log import METRICS, metric_definitions

MODEL_FILES = ["inference.py", "model.json", "model.safetensors", "model_card.py", "preprocessing.py"]


TRIAL = "tune-1-001-3f2a9c1e"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two epochs with hyperparameters as the console and boto3 send them (plain strings), run
    as a tuning job's trial: the objective metric among them, the trial's name in
    TRAINING_JOB_NAME."""
    base = tmp_path_factory.mktemp("plain") / "opt_ml"
    hyperparameters = {
        **FAST,
        "epochs": "2",
        "num_workers": "2",
        "val_fraction": "0.25",
        "augment": "True",
        "learning_rate": "0.005",
        "sagemaker_program": "train",
        "sagemaker_job_name": "test-job",
        "_tuning_objective_metric": "validation:mAP",
    }
    write_tree(base, hyperparameters, n_images=32)
    result = run_train(base, TRAINING_JOB_NAME=TRIAL)
    return base, result


def test_job_succeeds_and_writes_the_model(trained):
    base, result = trained
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not (base / "output" / "failure").exists()
    assert model_files(base) == MODEL_FILES


def test_model_json_holds_everything_to_rebuild(trained):
    base, _ = trained
    meta = json.loads((base / "model" / "model.json").read_text())
    assert meta["effdet_model_name"] == "tf_efficientdet_lite0"
    assert meta["img_size"] == 256 and meta["num_classes"] == 3
    assert meta["classes"] == [
        {"label": 1, "id": 3, "name": "rectangle"},
        {"label": 2, "id": 7, "name": "ellipse"},
        {"label": 3, "id": 12, "name": "triangle"},
    ]
    # tf_lite0's own statistics (effdet's config), not ImageNet's (issue 13)
    assert meta["normalization"] == {**meta["normalization"], "mean": [0.5] * 3, "std": [0.5] * 3, "fill": [128] * 3}
    assert meta["hyperparameters"]["learning_rate"] == 0.005
    assert meta["monitor"] == "valid_map" and meta["best_epoch"] in (1, 2)
    assert len(meta["history"]) == 2
    assert set(meta["metrics"]) >= {"train_loss", "valid_loss", "valid_map", "valid_map_50", "lr"}
    assert meta["data"] == {"how": "random, val_fraction=0.25, seed=42", "train": 24, "val": 8}


def test_data_report_is_written(trained):
    base, result = trained
    report = json.loads((base / "output" / "data" / "data_report.json").read_text())
    assert report["counts"]["images_used"] == 32
    assert "data: 32 images and" in result.stdout


def test_one_plain_line_per_epoch_and_no_progress_bars(trained):
    _, result = trained
    lines = [l for l in result.stdout.splitlines() if re.search(r"\bepoch=\d+/2 ", l)]
    assert len(lines) == 2, result.stdout[-3000:]
    assert "\r" not in result.stdout


def test_metric_definitions_match_the_log(trained):
    _, result = trained
    definitions = json.loads((REPO / "metric_definitions.json").read_text())
    assert definitions == metric_definitions()
    assert len(definitions) <= 40
    for definition in definitions:
        assert 1 <= len(definition["Name"]) <= 255 and 1 <= len(definition["Regex"]) <= 500
        values = [
            float(m.group(1))
            for line in result.stdout.splitlines()
            if (m := re.search(definition["Regex"], line))
        ]
        if definition["Name"] == "validation:mAP_small":
            # The demo shapes are all 32x32 px or larger: COCO has no small AP, the line omits it.
            assert values == [], (definition, result.stdout[-2000:])
            continue
        assert len(values) == 2, (definition, result.stdout[-2000:])
    by_name = {d["Name"]: d["Regex"] for d in definitions}
    assert {name for name, _ in METRICS} == set(by_name)
    line = next(l for l in result.stdout.splitlines() if "epoch=2/2" in l)
    mAP = float(re.search(by_name["validation:mAP"], line).group(1))
    mAP50 = float(re.search(by_name["validation:mAP_50"], line).group(1))
    assert 0 <= mAP <= mAP50 <= 1


def test_model_rebuilds_from_model_folder_alone_and_predicts(trained, tmp_path):
    base, _ = trained
    # A copy of model/ (what model.tar.gz holds), used without this repository's code.
    model_dir = tmp_path / "unpacked"
    shutil.copytree(base / "model", model_dir)
    image = next((base / "input" / "data" / "training" / "images").glob("*.jpg"))
    out = subprocess.run(
        [sys.executable, "-I", str(model_dir / "inference.py"), str(model_dir), str(image), "--threshold", "0"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    detections = json.loads(out.stdout.splitlines()[-1])["detections"]
    assert len(detections) > 0
    width, height = Image.open(image).size
    for det in detections:
        x1, y1, x2, y2 = det["box"]
        assert det["category_id"] in (3, 7, 12)
        assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height

    # The same weights loaded in-process reproduce the script's output exactly.
    spec = importlib.util.spec_from_file_location("inference", model_dir / "inference.py")
    inference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(inference)
    model, meta = inference.load_model(model_dir)
    again = inference.predict(model, meta, Image.open(image), threshold=0)
    assert [d["category_id"] for d in again] == [d["category_id"] for d in detections]
    assert again[0]["score"] == pytest.approx(detections[0]["score"], rel=1e-4)


def test_a_tuning_trial_checkpoints_in_a_folder_of_its_own(trained):
    """The trials of a tuning job share one CheckpointConfig: each writes below its own job name,
    so that no trial resumes (or prunes) another's checkpoints."""
    base, result = trained
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    trial = base / "checkpoints" / TRIAL
    assert list_checkpoints(trial), sorted(p.name for p in (base / "checkpoints").rglob("*"))
    assert not list_checkpoints(base / "checkpoints")


def test_json_encoded_hyperparameters_and_validation_channel(tmp_path):
    """Framework estimators json.dumps every value; a validation channel replaces the split."""
    hyperparameters = {
        key: json.dumps(value)
        for key, value in {
            "backbone": "models.ross.efficientdet.backbones.tf_lite0",
            "model_type": "models.ross.efficientdet",
            "img_size": 256,
            "batch_size": 6,
            "epochs": 1,
            "pretrained": False,
            "augment": False,
            "optimizer": "sgd",
            "lr_schedule": "step",
            "learning_rate": 0.01,
            "monitor": "valid_loss",
            "num_workers": 0,
            "num_classes": 4,
            "tensorboard": False,
        }.items()
    }
    base = write_tree(tmp_path / "opt_ml", hyperparameters, n_images=12, validation_images=6)
    result = run_train(base)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    meta = json.loads((base / "model" / "model.json").read_text())
    assert meta["data"] == {"how": "validation channel", "train": 12, "val": 6}
    assert meta["monitor"] == "valid_loss"
    assert meta["hyperparameters"]["optimizer"] == "sgd" and meta["hyperparameters"]["augment"] is False
    # tensorboard false: no events; the report is written all the same
    assert not (base / "output" / "tensorboard").exists()
    assert (base / "output" / "data" / "report" / "index.html").exists()


@pytest.fixture(scope="module")
def from_coco_file(tmp_path_factory):
    """One epoch from a COCO detector file in a 'pretrained' channel (learning rate 1e-9), no
    validation set, one image that cannot be read: two tests' job in one ./train."""
    from effdet import create_model

    base = write_tree(
        tmp_path_factory.mktemp("pretrained") / "opt_ml",
        {**FAST, "pretrained": "true", "learning_rate": "1e-9", "warmup_epochs": "0", "val_fraction": "0"},
        n_images=8,
    )
    coco_model = create_model("tf_efficientdet_lite0", num_classes=90, pretrained=False, pretrained_backbone=False)
    channel = base / "input" / "data" / "pretrained"
    channel.mkdir(parents=True)
    weights = coco_model.state_dict()
    torch.save(weights, channel / "tf_efficientdet_lite0-dfacfc78.pth")
    (base / "input" / "data" / "training" / "images" / "shape_00002.jpg").write_bytes(b"not a jpeg")
    return base, run_train(base), weights


def test_pretrained_weights_from_a_channel(from_coco_file):
    """pretrained=true with a 'pretrained' channel: the file is loaded, the class head is new."""
    base, result, weights = from_coco_file
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "pretrained weights: " in result.stdout and "tf_efficientdet_lite0-dfacfc78.pth" in result.stdout
    from safetensors.torch import load_file

    trained = load_file(str(base / "model" / "model.safetensors"))
    # With a negligible learning rate the convolutions are still the ones from the file.
    conv = "backbone.conv_stem.weight"
    assert torch.allclose(trained[conv], weights[conv], atol=1e-5)
    assert trained["class_net.predict.conv_pw.weight"].shape[0] == 3 * 9  # 3 classes x 9 anchors


def test_pretrained_without_weights_or_network_says_how_to_fix(tree):
    base = tree({**FAST, "pretrained": "true"}, n_images=4)
    result = run_train(base)
    assert result.returncode != 0
    reason = failure_text(base).splitlines()[0]
    assert "could not download the COCO-pretrained weights for backbone 'tf_lite0'" in reason
    assert "channel named 'pretrained' holding tf_efficientdet_lite0-dfacfc78.pth" in reason
    assert "set the hyperparameter pretrained to false" in reason
    assert model_files(base) == []


@pytest.mark.parametrize(
    "hyperparameters, expected",
    [
        ({"learning_rat": "0.1"}, "unknown hyperparameter 'learning_rat'; did you mean 'learning_rate'?"),
        ({"img_size": "300"}, "hyperparameter 'img_size' has invalid value '300': it must be a multiple of 128"),
        ({**FAST, "num_classes": "7"}, "'num_classes' is 7 but the data has 3 categories (3: rectangle, 7: ellipse, 12: triangle)"),
        ({**FAST, "annotations_file": "nope.json"}, "annotations_file 'nope.json' was not found"),
    ],
)
def test_bad_input_fails_with_one_sentence(tree, hyperparameters, expected):
    base = tree(hyperparameters, n_images=4)
    result = run_train(base)
    assert result.returncode == 2
    text = failure_text(base)
    first = text.splitlines()[0]
    assert expected in first
    assert len(first) <= 1024 and "Traceback" not in text
    assert model_files(base) == []


def test_pipe_mode_and_missing_channel_fail_clearly(tree):
    base = tree(FAST, n_images=2, input_mode="Pipe")
    assert run_train(base).returncode == 2
    assert "channel 'training' uses Pipe input mode" in failure_text(base)
    shutil.rmtree(base / "input" / "data" / "training")
    (base / "input" / "config" / "inputdataconfig.json").unlink()
    assert run_train(base).returncode == 2
    assert "the job has no 'training' channel" in failure_text(base)


def test_unreadable_images_are_skipped_mid_epoch(from_coco_file):
    base, result, _ = from_coco_file
    assert result.returncode == 0, result.stdout[-3000:]
    assert "skipping image: cannot read images/shape_00002.jpg" in result.stdout
    assert re.search(r"epoch=1/1 .*images_skipped=1\b", result.stdout)
    meta = json.loads((base / "model" / "model.json").read_text())
    assert meta["monitor"] is None and meta["best_epoch"] == 1  # no validation set: last epoch


def test_job_fails_when_no_image_can_be_read(tree):
    base = tree(FAST, n_images=4)
    for jpg in (base / "input" / "data" / "training" / "images").glob("*.jpg"):
        jpg.write_bytes(b"not a jpeg")
    result = run_train(base)
    assert result.returncode == 2
    first = failure_text(base).splitlines()[0]
    assert first.startswith("no training image could be read in epoch 1")
    assert "Traceback" not in failure_text(base)
    assert model_files(base) == []
