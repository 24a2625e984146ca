"""Inputs the checks used to miss: configuration files of the wrong type, places the job
cannot write, unbounded failure reasons, and real-world images (odd sizes, cut-short JPEGs,
malformed entries) through the real ./train."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sm_effdet.environment import Paths, check_writable, read_environment
from sm_effdet.errors import FAILURE_REASON_LIMIT, UserInputError, bounded_reason, shorten, write_failure

from conftest import FAST, failure_text, model_files, run_train, write_tree


# --- configuration files of the wrong type -------------------------------------------------

@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("inputdataconfig.json", b'["training"]', r"inputdataconfig.json must be a JSON object of channel name"),
        ("inputdataconfig.json", b'{"training": "File"}', r"'training' in .*inputdataconfig.json must be a JSON object"),
        ("resourceconfig.json", b'["algo-1"]', r"resourceconfig.json must be a JSON object"),
        ("resourceconfig.json", b'{"current_host": "algo-1", "hosts": "algo-1"}',
         r"'hosts' in .*resourceconfig.json must be a list of host names .* not \"algo-1\""),
        ("resourceconfig.json", b'{"current_host": 1, "hosts": ["algo-1"]}', r"'current_host' in .*resourceconfig.json must be a host name"),
        ("checkpointconfig.json", b'[]', None),  # empty: the default location
        ("checkpointconfig.json", b'["/x"]', r"checkpointconfig.json must be a JSON object"),
        ("checkpointconfig.json", b'{"LocalPath": 5}', r"'LocalPath' in .*checkpointconfig.json must be a directory path .* not 5"),
        ("hyperparameters.json", '{"epochs": "2", "seed": "\u00e9"}'.encode("latin-1"), r"hyperparameters.json is not UTF-8 text"),
        ("hyperparameters.json", b"[" * 100_000 + b"]" * 100_000, r"hyperparameters.json is nested too deeply"),
        ("resourceconfig.json", b'{"hosts": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", r"resourceconfig.json is nested too deeply"),
    ],
)
def test_wrong_typed_config_names_file_key_and_expectation(tmp_path, name, content, expected):
    paths = Paths(tmp_path)
    paths.input_config.mkdir(parents=True)
    (paths.input_config / name).write_bytes(content)
    if expected is None:
        assert read_environment(paths).checkpoint_dir == paths.default_checkpoint_dir
        return
    with pytest.raises(UserInputError, match=expected) as info:
        read_environment(paths)
    message = str(info.value)
    assert name in message and ("fix" in message or "save" in message or "give" in message)
    assert len(message) < FAILURE_REASON_LIMIT


def test_hosts_stay_whole_names(tmp_path):
    paths = Paths(tmp_path)
    paths.input_config.mkdir(parents=True)
    paths.resource_config_file.write_text(json.dumps({"current_host": "algo-2", "hosts": ["algo-1", "algo-2"]}))
    env = read_environment(paths)
    assert env.hosts == ("algo-1", "algo-2") and env.current_host == "algo-2"


# --- bounded failure reasons ---------------------------------------------------------------

def test_shorten_keeps_both_ends():
    assert shorten("short") == "short"
    text = shorten("a" * 50 + "b" * 100_000 + "c" * 50, 80)
    assert len(text) <= 80 and text.startswith("aaaa") and text.endswith("cccc")
    assert "(100100 characters)" in text


def test_write_failure_cuts_the_middle_keeping_start_and_advice(tmp_path):
    reason = "the thing is wrong: " + "x" * 5000 + "; do this to fix it."
    write_failure(tmp_path / "failure", reason)
    written = (tmp_path / "failure").read_text()
    assert len(written.rstrip("\n")) == FAILURE_REASON_LIMIT
    assert written.startswith("the thing is wrong: ") and written.rstrip().endswith("; do this to fix it.")
    assert bounded_reason("short.") == "short."


# --- writability, before training ----------------------------------------------------------

@contextlib.contextmanager
def immutable(path: Path):
    """A directory not even root can write: the immutable attribute (chmod does not stop root)."""
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not available to make a directory read-only for root")
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True)
    if done.returncode:
        pytest.skip(f"this file system has no immutable attribute: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_check_writable_names_each_path(tmp_path):
    paths = Paths(tmp_path)
    check_writable(paths, None)  # creates what is missing, as the job would
    assert paths.model_dir.is_dir() and paths.default_checkpoint_dir.is_dir()
    assert not list(paths.model_dir.iterdir())  # the probe leaves nothing behind
    checkpoint_file = tmp_path / "checkpoint-file"
    checkpoint_file.write_text("not a folder")
    with pytest.raises(UserInputError, match=r"the checkpoint location .*checkpoint-file is a file, not a directory; set CheckpointConfig's LocalPath"):
        check_writable(paths, checkpoint_file)
    with immutable(paths.model_dir):
        with pytest.raises(UserInputError, match=r"the model directory .*model cannot be written \(Operation not permitted\); make it a writable directory\."):
            check_writable(paths, None)


# --- the real ./train: failures before training, each one sentence within 1024 characters --

def _swap_validation_names(base: Path) -> None:
    path = base / "input" / "data" / "validation" / "annotations.json"
    coco = json.loads(path.read_text())
    cats = coco["categories"]
    cats[0]["name"], cats[1]["name"] = cats[1]["name"], cats[0]["name"]
    path.write_text(json.dumps(coco))


def _checkpoint_location_is_a_file(base: Path) -> None:
    (base / "ckpt").write_text("a file where the checkpoints should go")
    (base / "input" / "config" / "checkpointconfig.json").write_text(json.dumps({"LocalPath": str(base / "ckpt")}))


def _model_is_a_file(base: Path) -> None:
    (base / "model").write_text("a file where the model folder should be")


def _hosts_as_text(base: Path) -> None:
    (base / "input" / "config" / "resourceconfig.json").write_text(
        json.dumps({"current_host": "algo-1", "hosts": "algo-1"})
    )


LONG = "v" * 100_000


@pytest.mark.parametrize(
    "hyperparameters, edit, validation_images, expected",
    [
        ({"optimizer": LONG}, None, 0,
         ["hyperparameter 'optimizer' has invalid value 'vvv", "(100000 characters)", "it must be one of adamw, sgd."]),
        ({"annotations_file": LONG}, None, 0,
         ["annotations_file 'vvv", "(100000 characters)", "give a path relative to the channel's root."]),
        ({"seed": str(2**32)}, None, 0, ["'seed' has invalid value '4294967296': it must be at most 4294967295."]),
        ({}, _hosts_as_text, 0, ["'hosts' in", "resourceconfig.json must be a list of host names"]),
        ({}, _checkpoint_location_is_a_file, 0, ["the checkpoint location", "ckpt is a file, not a directory"]),
        ({}, _model_is_a_file, 0, ["the model directory", "model is a file, not a directory"]),
        ({}, _swap_validation_names, 3,
         ["the validation channel's categories in", "validation/annotations.json do not match",
          "validation has 3: ellipse, 7: rectangle where training has 3: rectangle, 7: ellipse, 12: triangle"]),
    ],
    ids=["long value", "long annotations_file", "seed range", "hosts text", "checkpoint file", "model file",
         "validation categories"],
)
def test_bad_inputs_fail_before_training_in_one_bounded_sentence(
    tmp_path, hyperparameters, edit, validation_images, expected
):
    base = write_tree(tmp_path / "opt_ml", {**FAST, **hyperparameters}, n_images=4,
                      validation_images=validation_images)
    if edit is not None:
        edit(base)
    result = run_train(base, timeout=120)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    reason = failure_text(base)
    assert len(reason.rstrip("\n")) <= FAILURE_REASON_LIMIT and reason.count("\n") == 1
    for part in expected:
        assert part in reason
    assert "Traceback" not in reason
    assert "first training step" not in result.stdout  # refused before any training
    if (base / "model").is_dir():
        assert model_files(base) == []


def test_read_only_model_directory_fails_before_training(tmp_path):
    base = write_tree(tmp_path / "opt_ml", FAST, n_images=4)
    (base / "model").mkdir()
    with immutable(base / "model"):
        result = run_train(base, timeout=120)
    assert result.returncode == 2
    assert failure_text(base).startswith(
        f"the model directory {base / 'model'} cannot be written (Operation not permitted); "
        "make it a writable directory."
    )
    assert "first training step" not in result.stdout  # refused before any training


# --- the real ./train on real-world images --------------------------------------------------

def _photo(width: int, height: int, seed: int) -> tuple[bytes, list[float]]:
    """A JPEG with photo-like detail and one bright object; returns its bytes and the box."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 200, (max(height // 24, 2), max(width // 24, 2), 3), dtype=np.uint8)
    pixels = np.array(Image.fromarray(small).resize((width, height), Image.BICUBIC))
    x, y, w, h = width // 4, height // 3, width // 3, height // 4
    pixels[y : y + h, x : x + w] = (250, 250, 40)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue(), [x, y, w, h]


def test_odd_sized_cut_short_and_malformed_entries_train_and_are_reported(tmp_path):
    base = write_tree(tmp_path / "opt_ml", {**FAST, "split_file": "split.json"}, n_images=6)
    channel = base / "input" / "data" / "training"
    coco = json.loads((channel / "annotations.json").read_text())
    category = coco["categories"][0]["id"]
    odd_sizes = [(899, 626), (1021, 767), (613, 1031)]  # decoded at 1/2 by libjpeg at 256 px
    for k, (width, height) in enumerate(odd_sizes + [(640, 480)]):
        data, box = _photo(width, height, seed=k)
        if k == len(odd_sizes):  # an interrupted download: the last bytes are missing
            data = data[: len(data) - 150]
        (channel / "images" / f"photo_{k}.jpg").write_bytes(data)
        coco["images"].append({"id": 100 + k, "file_name": f"images/photo_{k}.jpg", "width": width, "height": height})
        coco["annotations"].append(
            {"id": 900 + k, "image_id": 100 + k, "category_id": category, "bbox": box, "area": box[2] * box[3],
             "iscrowd": "0"}
        )
    coco["images"] += [
        {"id": 200, "file_name": "images/" + "n" * 300 + ".jpg", "width": 10, "height": 10},
        {"id": [201], "file_name": "images/photo_0.jpg", "width": 899, "height": 626},
    ]
    coco["images"][0]["width"] = float("inf")  # read from the file instead
    (channel / "annotations.json").write_text(json.dumps(coco))
    ids = [image["id"] for image in coco["images"] if isinstance(image["id"], int)]
    train_ids = [i for i in ids if i not in (1, 103)]  # 2 is in both lists
    (channel / "split.json").write_text(json.dumps({"train": train_ids, "val": [1, 2, 103]}))

    result = run_train(base)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    report = json.loads((base / "output" / "data" / "data_report.json").read_text())
    counts = report["counts"]
    assert "image_skipped_at_load" not in counts, report["examples"]  # no "size mismatch"
    assert counts["image_truncated_but_used"] == 1
    assert report["examples"]["image_truncated_but_used"] == ["images/photo_3.jpg"]
    assert counts["image_skipped_invalid_file_name"] == 1
    assert counts["image_skipped_malformed_entry"] == 1
    assert counts["image_size_read_from_file"] == 1
    assert "crowd_regions_ignored" not in counts  # iscrowd "0" is not a crowd
    assert counts["split_ids_in_both_lists"] == 1
    assert report["split"]["val"] == 2 and report["split"]["train"] == 8
    assert report["channels"]["training"]["images_used"] == 10
    assert "photo_3.jpg is cut short" in result.stdout
    assert model_files(base)
