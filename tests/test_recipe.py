"""Starting points and the training recipe, through the real ./train: warm start from an earlier
model, ImageNet backbone weights, freezing, EMA of the weights, SGD's defaults."""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
import tarfile

import pytest
import torch
from conftest import FAST, REPO, TRAINED_MODEL_IMAGES, failure_text, run_train, write_tree
from safetensors.torch import load_file, save_file

from sm_effdet.hyperparameters import (
    AUTO_BATCH_MIN_STEPS,
    AUTO_BATCH_SIZES,
    DEFAULT_LEARNING_RATES,
    RECIPES,
)

sys.path.insert(0, str(REPO / "scripts"))
from convert_efficientnet_lite0 import converted_state

HEAD = "class_net.predict.conv_pw."
ANCHORS = 9  # effdet's 3 scales x 3 aspect ratios


def trained_weights(base):
    return load_file(str(base / "model" / "model.safetensors"))


def class_rows(tensor, num_classes):
    """[anchors, classes, ...]: effdet orders the head's outputs anchors-major."""
    return tensor.view(ANCHORS, num_classes, *tensor.shape[1:])


@pytest.fixture(scope="module")
def first_model(trained_model):
    """One epoch from scratch with effdet's EMA: the model the warm starts begin from. The
    session's trained model (conftest.trained_model) is such a job; one ./train fewer."""
    meta = json.loads((trained_model / "model" / "model.json").read_text())
    assert meta["hyperparameters"]["ema_decay"] == 0.9998
    assert meta["data"]["train"] + meta["data"]["val"] == TRAINED_MODEL_IMAGES
    return trained_model


def test_ema_weights_differ_from_raw_and_are_the_model(first_model):
    checkpoint = max((first_model / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    model = trained_weights(first_model)
    raw = {k.removeprefix("bench.model."): v for k, v in state.items() if k.startswith("bench.model.")}
    ema = {k.removeprefix("ema.module."): v for k, v in state.items() if k.startswith("ema.module.")}
    assert set(ema) == set(model) == set(raw)
    assert all(torch.equal(model[k], ema[k]) for k in model)
    differ = [k for k in model if model[k].is_floating_point() and not torch.equal(model[k], raw[k])]
    assert len(differ) > len(model) // 2


def test_the_long_recipe_averages_the_weights_and_batch_size_auto_is_chosen(tmp_path):
    """recipe=long by hand on a one-epoch job: the log says the recipe, and the checkpoint holds
    the moving average (ema_decay auto follows the recipe); batch_size auto says its choice."""
    hyperparameters = {k: v for k, v in FAST.items() if k != "batch_size"} | {"recipe": "long", "val_fraction": "0.25"}
    base = write_tree(tmp_path / "opt_ml", hyperparameters, n_images=16)
    result = run_train(base)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # batch_size auto on 12 training images: far fewer steps an epoch than the minimum at any size.
    small = AUTO_BATCH_SIZES[-1]
    assert (f"batch size {small} per process (batch_size auto: 12 training images make {math.ceil(12 / small)} "
            f"steps an epoch at {small}, the smallest of {', '.join(map(str, AUTO_BATCH_SIZES))}; none makes "
            f"{AUTO_BATCH_MIN_STEPS})") in result.stdout
    decay = RECIPES["long"]["ema_decay"]
    assert (f"recipe: long: scale 0.5-1.5 on 100% of the images, EMA {decay:g} with warm-up (ema_decay auto)"
            in result.stdout)
    checkpoint = next((base / "checkpoints").glob("*.ckpt"))
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    assert any(k.startswith("ema.module.") for k in state)


def _model_channel(base, source):
    channel = base / "input" / "data" / "model"
    shutil.copytree(source / "model", channel)
    return channel


# The weights barely move (learning rate 1e-9, no EMA), so the model shows what was loaded.
STILL = {**FAST, "learning_rate": "1e-9", "warmup_epochs": "0", "ema_decay": "0", "val_fraction": "0.25"}


def test_warm_start_with_the_same_classes_keeps_every_weight(first_model, tmp_path):
    base = write_tree(tmp_path / "opt_ml", STILL, n_images=TRAINED_MODEL_IMAGES)  # the same split
    _model_channel(base, first_model)
    result = run_train(base)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "classes kept 3 (rectangle, ellipse, triangle), new 0 (-), dropped 0 (-)" in result.stdout
    before, after = trained_weights(first_model), trained_weights(base)
    convs = [k for k in before if k.endswith(".weight") and before[k].ndim == 4]
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in convs)

    # The starting weights are validated first, as epoch 0, on the same split as the first job:
    # the same loss and mAP as the first job's best epoch, and a candidate for the best epoch.
    first, meta = (json.loads((b / "model" / "model.json").read_text()) for b in (first_model, base))
    start = meta["history"][0]
    assert start["epoch"] == 0 and "train_loss" not in start
    assert start["valid_loss"] == pytest.approx(first["metrics"]["valid_loss"], rel=1e-5)
    assert start["valid_map"] == pytest.approx(first["metrics"]["valid_map"], abs=1e-6)
    assert [h["epoch"] for h in meta["history"]] == [0, 1]
    assert "epoch=0/1 valid_loss=" in result.stdout and "(the starting weights, before training)" in result.stdout
    scores = [h["valid_map"] for h in meta["history"]]
    assert meta["best_epoch"] == scores.index(max(scores))  # the first of the best: epoch 0 on a tie
    if meta["best_epoch"] == 0:  # then the model is the starting point itself
        assert all(torch.equal(before[k], after[k]) for k in before)
    assert "report: could not" not in result.stdout + result.stderr
    page = (base / "output" / "data" / "report" / "index.html").read_text()
    assert "<td>epochs run</td><td>1</td>" in page
    assert re.search(r"<tr><td>0</td><td>[0-9.e+-]+</td>", page)  # epoch 0's row, its valid_loss


def test_warm_start_from_model_tar_gz_with_a_class_added(first_model, tmp_path):
    base = write_tree(tmp_path / "opt_ml", STILL, n_images=16)
    annotations = base / "input" / "data" / "training" / "annotations.json"
    coco = json.loads(annotations.read_text())
    coco["categories"].append({"id": 20, "name": "star"})
    for annotation in coco["annotations"][::3]:
        annotation["category_id"] = 20
    annotations.write_text(json.dumps(coco))
    channel = base / "input" / "data" / "model"
    channel.mkdir(parents=True)
    with tarfile.open(channel / "model.tar.gz", "w:gz") as tar:
        for name in ("model.json", "model.safetensors", "inference.py"):
            tar.add(first_model / "model" / name, arcname=name)

    result = run_train(base)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "classes kept 3 (rectangle, ellipse, triangle), new 1 (star), dropped 0 (-)" in result.stdout
    assert "model.tar.gz" in result.stdout
    meta = json.loads((base / "model" / "model.json").read_text())
    assert [c["name"] for c in meta["classes"]] == ["rectangle", "ellipse", "triangle", "star"]
    before, after = trained_weights(first_model), trained_weights(base)
    old = class_rows(before[HEAD + "weight"], 3)
    new = class_rows(after[HEAD + "weight"], 4)
    assert torch.allclose(new[:, :3], old, atol=1e-6)  # the known classes' rows, every anchor
    assert not torch.allclose(new[:, 3], old[:, 2], atol=1e-3)  # star starts fresh


def test_warm_start_from_another_backbone_is_refused(first_model, tmp_path):
    base = write_tree(tmp_path / "opt_ml", {**FAST, "backbone": "tf_lite1"}, n_images=4)
    _model_channel(base, first_model)
    result = run_train(base)
    assert result.returncode != 0
    reason = failure_text(base)
    assert "trained with backbone 'tf_lite0', but this job's backbone is 'tf_lite1'" in reason
    assert "set backbone to 'tf_lite0' or remove the 'model' channel" in reason
    assert not (base / "model" / "model.safetensors").exists()


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory):
    """ImageNet EfficientNet-Lite0 weights under timm's names, as a user would prepare them."""
    path = tmp_path_factory.mktemp("imagenet") / "tf_efficientnet_lite0.safetensors"
    save_file(converted_state(), str(path))
    return path


def test_backbone_weights_from_a_channel_and_a_frozen_backbone(backbone_file, tmp_path):
    """pretrained=backbone: every backbone tensor from the file, none in the heads; frozen for
    the (only) epoch (no gradients: requires_grad off), so the backbone the model holds is
    exactly the file's. The backbone's learning rate is its share of learning_rate."""
    base = write_tree(
        tmp_path / "opt_ml",
        {**FAST, "pretrained": "backbone", "freeze_backbone_epochs": "1", "val_fraction": "0.25",
         "backbone_lr_ratio": "0.5"},
        n_images=16,
    )
    channel = base / "input" / "data" / "pretrained"
    channel.mkdir(parents=True)
    shutil.copy(backbone_file, channel)
    result = run_train(base)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "(240 of 240 backbone tensors as timm's tf_efficientnet_lite0" in result.stdout
    assert "backbone frozen: epochs 1 to 1 train the FPN and heads only" in result.stdout
    rate = DEFAULT_LEARNING_RATES["adamw"]["backbone"]
    assert (f"learning rates: FPN and heads {rate:g} (learning_rate auto: {rate:g} for adamw for a start from "
            f"the ImageNet backbone), backbone {rate / 2:g} (backbone_lr_ratio 0.5)") in result.stdout
    assert "recipe: short: scale 0.75-1.25 on 50% of the images, no EMA (ema_decay auto)" in result.stdout

    imagenet = load_file(str(backbone_file))
    model = trained_weights(base)
    backbone = {k.removeprefix("backbone."): v for k, v in model.items() if k.startswith("backbone.")}
    loaded = [k for k in backbone if not k.endswith("num_batches_tracked")]
    assert len(loaded) == 240 and all(torch.equal(backbone[k], imagenet[k]) for k in loaded)
    heads = [k for k in model if not k.startswith("backbone.")]
    assert heads and not any(k.removeprefix("backbone.") in imagenet for k in heads)



# Measured on this configuration (96 shapes images, batch 4, 8 epochs, no augmentation, from
# scratch): optimizer=sgd alone (learning rate 0.1, no clipping) reached valid mAP 0.145, 0.188
# and 0.129 with seeds 42, 1 and 2; the old defaults (learning rate 0.01, clipped at 10) reached
# 0.001. The bound sits well below the first and far above the second.
SGD_MAP_BOUND = 0.05


def test_sgd_with_only_the_optimizer_set_learns(tmp_path):
    hyperparameters = {**FAST, "optimizer": "sgd", "epochs": "8", "batch_size": "4", "augment": "false"}
    base = write_tree(tmp_path / "opt_ml", hyperparameters, n_images=96)
    result = run_train(base)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    meta = json.loads((base / "model" / "model.json").read_text())
    assert meta["hyperparameters"]["learning_rate"] == "auto"
    assert meta["hyperparameters"]["optimizer"] == "sgd"
    assert meta["metrics"]["valid_map"] > SGD_MAP_BOUND, meta["history"]


def test_a_model_channel_without_a_usable_model_is_refused_with_a_sentence(tmp_path):
    from sm_effdet.errors import UserInputError
    from sm_effdet.training.warm_start import read_previous_model

    channel = tmp_path / "model"
    channel.mkdir()
    with pytest.raises(UserInputError, match="holds neither model.json with model.safetensors nor model.tar.gz"):
        read_previous_model(channel)
    (channel / "model.safetensors").write_bytes(b"")
    (channel / "model.json").write_text('{"backbone": "tf_lite0"}')
    with pytest.raises(UserInputError, match=r"model.json lacks effdet_model_name, .*use the model.json a training job wrote"):
        read_previous_model(channel)
    (channel / "model.json").write_text("not json")
    with pytest.raises(UserInputError, match="is not readable JSON"):
        read_previous_model(channel)
    (channel / "model.json").unlink()
    (channel / "model.tar.gz").write_bytes(b"not a tar file")
    with pytest.raises(UserInputError, match="cannot read .*model.tar.gz"):
        read_previous_model(channel)


def test_backbone_weights_offline_or_missing_say_how_to_fix(tmp_path):
    """pretrained=backbone without the weights: one sentence naming timm's file to provide."""
    base = write_tree(tmp_path / "offline" / "opt_ml", {**FAST, "pretrained": "backbone"}, n_images=4)
    # Nothing cached, no network; HF_HUB_OFFLINE spares the test the hub's 46 s of retries.
    result = run_train(base, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1")
    assert result.returncode != 0
    reason = failure_text(base)
    assert reason.startswith("could not download the ImageNet weights of backbone 'tf_lite0' (timm's tf_efficientnet_lite0)")
    assert "add a channel named 'pretrained' holding a file with timm's tf_efficientnet_lite0 weights" in reason
    assert "Traceback" not in reason and len(reason) <= 1024

    # A channel holding the COCO detector (class_net keys) instead of backbone weights.
    base = write_tree(tmp_path / "detector" / "opt_ml", {**FAST, "pretrained": "backbone"}, n_images=4)
    channel = base / "input" / "data" / "pretrained"
    channel.mkdir()
    save_file({"backbone.conv_stem.weight": torch.zeros(32, 3, 3, 3), "class_net.predict.conv_pw.bias": torch.zeros(9)},
              str(channel / "tf_efficientdet_lite0.safetensors"))
    result = run_train(base, HF_HOME=str(tmp_path / "hf-home"))
    assert result.returncode != 0
    reason = failure_text(base)
    assert "pretrained is 'backbone' but the 'pretrained' channel" in reason
    assert "holds no backbone weights files (files: tf_efficientdet_lite0.safetensors)" in reason
    assert "give exactly one file with timm's tf_efficientnet_lite0 ImageNet weights" in reason
    assert not (base / "model" / "model.safetensors").exists()


def test_a_thawed_backbone_ramps_up_over_the_warm_up_length():
    """Frozen: factor 0. Thawed: the schedule times a ramp over the warm-up length, because the
    backbone's optimiser state starts afresh then (it had no gradients while frozen)."""
    from sm_effdet.training.lightning_module import backbone_schedule, lr_factor_fn

    schedule = lr_factor_fn("cosine", 100, 10)
    assert backbone_schedule(schedule, 0, 10) is schedule
    thawing = backbone_schedule(schedule, 30, 10)
    assert [thawing(s) for s in (0, 29)] == [0.0, 0.0]
    for step in range(30, 40):
        assert thawing(step) == pytest.approx(schedule(step) * (step - 29) / 10)
    assert [thawing(s) for s in (40, 99)] == [schedule(40), schedule(99)]
