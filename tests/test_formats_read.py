"""Reading real YOLO exports right (issue 24): labels that are missing say so, pose rows give
their box, a data.yaml can neither expand without bound nor turn class names into booleans, and
label files without an image, or shared by two images, are counted.

Each export is written as its tool writes it (Roboflow's split folders and data.yaml,
Ultralytics' images/ and labels/), with Pillow images; every expected box is the pixel box the
test drew, and every count is the number of files the test wrote that way. Items about other
formats are in test_formats_read_manifests.py.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST, failure_text, run_train
from PIL import Image, ImageDraw
from test_formats import read

from sm_effdet.errors import UserInputError


def photo(path: Path, size: tuple[int, int], color=(70, 110, 150)) -> None:
    """A JPEG with something on it (flat 128-grey rows read as a JPEG cut short)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, color)
    ImageDraw.Draw(img).ellipse((2, 2, size[0] // 2, size[1] // 2), fill=(200, 60, 40))
    img.save(path, quality=90)


def yolo_row(cls: int, box: tuple, size: tuple[int, int], extra: str = "") -> str:
    """A label row as Ultralytics writes it: centre, width and height over the image's size."""
    (x1, y1, x2, y2), (w, h) = box, size
    row = f"{cls} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}"
    return row + extra


ROBOFLOW_YAML = """train: ../train/images
val: ../valid/images
test: ../test/images

nc: 2
names: ['cat', 'dog']

roboflow:
  workspace: pets-ws
  project: pets
  version: 3
  license: CC BY 4.0
  url: https://universe.roboflow.com/pets-ws/pets/dataset/3
"""


def roboflow_yolo(root: Path, n_train: int, n_valid: int, unlabelled: int) -> dict[str, tuple]:
    """A Roboflow "YOLOv8" export: train/ and valid/ with images/ and labels/, data.yaml and
    README.roboflow.txt at the root. The first `unlabelled` training images get no label file.
    Returns each image's (part, size, [(class, pixel box)]) by file stem."""
    root.mkdir(parents=True)
    (root / "data.yaml").write_text(ROBOFLOW_YAML)
    (root / "README.roboflow.txt").write_text("Pets - v3\nExported via roboflow.com\n")
    drawn = {}
    for part, n in (("train", n_train), ("valid", n_valid)):
        for k in range(n):
            stem = f"pet_{part}_{k:02d}_jpg.rf.{k:08x}"
            size = (64 + 8 * k, 48 + 4 * k)
            boxes = [(k % 2, (4 + k, 6, 30 + k, 40))]
            photo(root / part / "images" / f"{stem}.jpg", size)
            drawn[stem] = (part, size, boxes)
            if part == "train" and k < unlabelled:
                continue
            label = root / part / "labels" / f"{stem}.txt"
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text("".join(yolo_row(c, b, size) + "\n" for c, b in boxes))
    return drawn


# --- item 3: missing labels are counted in the summary line; a split with none fails ------------

def test_missing_label_files_are_in_the_summary_line_and_a_split_without_any_fails(tmp_path):
    channel = tmp_path / "training"
    drawn = roboflow_yolo(channel, n_train=10, n_valid=4, unlabelled=4)
    data, report = read({"training": channel})
    without = sorted(s for s in drawn if not (channel / drawn[s][0] / "labels" / f"{s}.txt").exists())
    assert len(without) == 4
    summary = report.summary()
    assert f"images_without_label_file={len(without)}" in summary and "all usable" not in summary
    assert (len(data.train), len(data.val)) == (10, 4)
    for r in data.train + data.val:
        part, size, boxes = drawn[Path(r.file_name).stem]
        expected = [] if Path(r.file_name).stem in without else [b for _, b in boxes]
        np.testing.assert_allclose(r.boxes.reshape(-1, 4), np.reshape(expected, (-1, 4)), atol=0.01)
        assert (r.width, r.height) == size

    shutil.rmtree(channel / "valid" / "labels")  # Roboflow's valid/labels/ lost on the way
    with pytest.raises(UserInputError) as failure:
        read({"training": channel})
    message = str(failure.value)
    first = sorted(s for s in drawn if drawn[s][0] == "valid")[0]
    assert message.startswith(f"none of the 4 images of 'val' in {channel / 'data.yaml'} has a label file")
    assert f"valid/labels/{first}.txt" in message and message.count(". ") == 0

    (channel / "valid" / "labels").mkdir()  # label files, all empty: no box to validate on
    for stem in drawn:
        if drawn[stem][0] == "valid":
            (channel / "valid" / "labels" / f"{stem}.txt").write_text("")
    with pytest.raises(UserInputError, match=r"^the validation set from the data.yaml train and val "
                       r"in .* has 4 images but no usable box \(see output/data/data_report.json: data:"):
        read({"training": channel})


def test_a_validation_channel_or_random_split_without_boxes_fails(tmp_path):
    training = tmp_path / "training"
    roboflow_yolo(training, n_train=6, n_valid=0, unlabelled=0)
    (training / "data.yaml").write_text("train: train/images\nnames: [cat, dog]\n")
    validation = tmp_path / "validation"  # a COCO file of three images and no annotation
    images = []
    for k in range(3):
        photo(validation / f"v{k}.jpg", (50, 40))
        images.append({"id": k, "file_name": f"v{k}.jpg", "width": 50, "height": 40})
    (validation / "annotations.json").write_text(json.dumps(
        {"images": images, "annotations": [], "categories": [{"id": 0, "name": "cat"}]}))
    with pytest.raises(UserInputError, match=r"validation channel's .*annotations.json has 3 images but no usable box"):
        read({"training": training, "validation": validation})
    # A random split whose validation images are all negatives: another seed or fraction helps.
    for label in (training / "train" / "labels").iterdir():
        if label.name.startswith(("pet_train_00", "pet_train_01")):
            continue
        label.write_text("")
    found = None
    for seed in range(40):
        try:
            read({"training": training}, val_fraction=0.2, seed=seed)
        except UserInputError as exc:
            found = str(exc)
            break
    assert found is not None and "random split (val_fraction=0.2" in found
    assert found.endswith("choose another seed or a larger val_fraction, or set val_fraction to 0 to train without validation.")


def _job(base: Path, channel_of) -> Path:
    data = base / "input" / "data"
    channel_of(data / "training")
    config = base / "input" / "config"
    config.mkdir(parents=True)
    (config / "hyperparameters.json").write_text(json.dumps(FAST))
    (config / "inputdataconfig.json").write_text(json.dumps({"training": {"TrainingInputMode": "File"}}))
    return base


def test_the_job_logs_missing_labels_and_fails_on_a_split_without_any(tmp_path):
    base = _job(tmp_path / "ok", lambda ch: roboflow_yolo(ch, 8, 3, unlabelled=3))
    result = run_train(base)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    rows = sum(len(p.read_text().split("\n")) - 1 for p in base.rglob("labels/*.txt"))
    assert f"data: 11 images and {rows} boxes listed; images_without_label_file=3\n" in log

    base = _job(tmp_path / "lost", lambda ch: roboflow_yolo(ch, 8, 3, unlabelled=3))
    shutil.rmtree(base / "input" / "data" / "training" / "valid" / "labels")
    result = run_train(base)
    log = result.stdout + result.stderr
    assert result.returncode == 2, log[-3000:]
    assert failure_text(base).startswith("none of the 3 images of 'val' in ")
    assert "images_without_label_file=6" in log  # the counts behind the refusal, logged
    report = json.loads((base / "output" / "data" / "data_report.json").read_text())
    assert report["counts"]["images_without_label_file"] == 6


# --- item 6: pose rows are a box and keypoints ---------------------------------------------------

def test_pose_labels_give_the_box_not_the_keypoints_bounds(tmp_path):
    channel = tmp_path / "training"
    size, box = (400, 200), (160, 90, 240, 110)
    photo(channel / "images" / "train" / "walk.jpg", size)
    photo(channel / "images" / "train" / "odd.jpg", size)
    # Ultralytics' pose layout: kpt_shape [keypoints, (x, y, visible)], flip_idx, names as a map.
    (channel / "data.yaml").write_text(
        "path: .\ntrain: images/train\nkpt_shape: [2, 3]\nflip_idx: [1, 0]\nnames:\n  0: person\n")
    keypoints = [(80, 20, 2), (400, 200, 1)]  # outside the box: not its corners
    extra = "".join(f" {x / size[0]:.6f} {y / size[1]:.6f} {v}" for x, y, v in keypoints)
    labels = channel / "labels" / "train"
    labels.mkdir(parents=True)
    (labels / "walk.txt").write_text(yolo_row(0, box, size, extra) + "\n")
    (labels / "odd.txt").write_text(yolo_row(0, box, size, extra + " 0.5") + "\n")  # a number too many
    data, report = read({"training": channel})
    rec = {Path(r.file_name).stem: r for r in data.train}
    np.testing.assert_allclose(rec["walk"].boxes, [box], atol=0.01)
    assert len(rec["odd"].boxes) == 0 and report.counts["box_dropped_malformed"] == 1

    (channel / "data.yaml").write_text("train: images/train\nkpt_shape: [17]\nnames: [person]\n")
    with pytest.raises(UserInputError, match=r"'kpt_shape' in .*data.yaml must be \[number of keypoints, 2 or 3\].* not \[17\]"):
        read({"training": channel})


# --- items 7 and 12: data.yaml holds plain text ---------------------------------------------------

BOMB = "".join(
    f"{a}: &{a} [{', '.join([f'*{p}'] * 9) if p else ', '.join(['lol'] * 9)}]\n"
    for p, a in zip([None, *"abcdefgh"], "abcdefghi")
)


@pytest.mark.parametrize("tail", ["train: images\nnames: [*i, b]\n", "train: *i\nnames: [cat]\n"])
def test_a_yaml_bomb_fails_before_anything_is_expanded(tmp_path, tail):
    channel = tmp_path / "training"
    photo(channel / "images" / "a.jpg", (32, 32))
    (channel / "data.yaml").write_text(BOMB + tail)
    started = time.monotonic()
    with pytest.raises(UserInputError, match=r"data.yaml uses a YAML alias \(\*a on line 2\); write each name and path out in full"):
        read({"training": channel})
    assert time.monotonic() - started < 10  # expanding it takes minutes and gigabytes


@pytest.mark.parametrize("names, found", [
    ("[cat, [a, b]]", "class 1 in 'names' of .* is not a plain name \\(found a YAML sequence\\)"),
    ("{0: cat, 1: {x: 1}}", "class 1 in 'names' of .* is not a plain name \\(found a YAML mapping\\)"),
    (f"[cat, {'x' * 300}]", "class 1 in 'names' of .* is 300 characters long; give each class a name of 1 to 256"),
    ("[cat, '']", "class 1 in 'names' of .* is empty"),
])
def test_names_that_are_not_plain_text_fail_with_one_sentence(tmp_path, names, found):
    channel = tmp_path / "training"
    photo(channel / "images" / "a.jpg", (32, 32))
    (channel / "data.yaml").write_text(f"train: images\nnames: {names}\n")
    with pytest.raises(UserInputError, match=found):
        read({"training": channel})


def test_a_path_of_unbounded_length_fails(tmp_path):
    channel = tmp_path / "training"
    photo(channel / "images" / "a.jpg", (32, 32))
    (channel / "data.yaml").write_text(f"train: {'a/' * 3000}images\nnames: [cat]\n")
    with pytest.raises(UserInputError, match="'train' in .*data.yaml is a path of 6,006 characters"):
        read({"training": channel})


@pytest.mark.parametrize("names", ["[no, yes, on, off, null]", "{0: no, 1: yes, 2: on, 3: off, 4: null}"])
def test_yaml_1_1_booleans_stay_class_names(tmp_path, names):
    channel = tmp_path / "training"
    written = ["no", "yes", "on", "off", "null"]
    size = (100, 80)
    photo(channel / "images" / "a.jpg", size)
    (channel / "labels").mkdir()
    boxes = [(10 + 15 * k, 10, 20 + 15 * k, 30) for k in range(5)]
    (channel / "labels" / "a.txt").write_text("".join(yolo_row(k, b, size) + "\n" for k, b in enumerate(boxes)))
    (channel / "data.yaml").write_text(f"train: images\nnames: {names}\n")
    data, _ = read({"training": channel})
    assert [(c.id, c.name) for c in data.categories] == list(enumerate(written))
    (record,) = data.train
    order = np.argsort(record.boxes[:, 0])
    assert [data.categories[int(label) - 1].name for label in record.labels[order]] == written
    np.testing.assert_allclose(record.boxes[order], boxes, atol=0.01)


# --- item 14: label files without an image, and one label file for two images -----------------

def test_label_files_without_image_and_shared_label_files_are_counted(tmp_path):
    channel = tmp_path / "training"
    size = (120, 90)
    (channel / "labels" / "train").mkdir(parents=True)
    box = (10, 20, 50, 60)
    for stem in ("a", "b", "same", "gone"):
        (channel / "labels" / "train" / f"{stem}.txt").write_text(yolo_row(0, box, size) + "\n")
    for name in ("a.jpg", "b.png", "same.jpg", "same.JPG"):  # no image for gone.txt
        photo(channel / "images" / "train" / name, size, (250, 250, 250) if name == "same.JPG" else (9, 9, 9))
    (channel / "data.yaml").write_text("path: .\ntrain: images/train\nnames: {0: cat}\n")
    data, report = read({"training": channel})
    assert sorted(r.file_name for r in data.train) == ["images/train/a.jpg", "images/train/b.png"]
    for r in data.train:
        np.testing.assert_allclose(r.boxes, [box], atol=0.01)
    c = report.counts
    assert c["label_files_without_image"] == 1 and report.examples["label_files_without_image"] == ["labels/train/gone.txt"]
    assert c["image_skipped_shared_label_file"] == 2 and c["images_listed"] == 4
    summary = report.summary()
    assert "label_files_without_image=1" in summary and "image_skipped_shared_label_file=2" in summary
