"""Reading COCO data: discovery, validation, the report and the splits."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sm_effdet import coco
from sm_effdet.coco import DataReport
from sm_effdet.demo import make_shapes_dataset
from sm_effdet.environment import Paths, read_environment
from sm_effdet.errors import UserInputError
from sm_effdet.hyperparameters import parse_hyperparameters
from sm_effdet.job import prepare_data


def load(channel: Path, name: str = "annotations.json") -> tuple[coco.CocoData, DataReport]:
    report = DataReport()
    return coco.load_coco(channel, channel / name, report), report


def test_non_contiguous_category_ids_map_to_labels_and_back(tmp_path):
    make_shapes_dataset(tmp_path, n_images=6)
    data, report = load(tmp_path)
    assert [(c.id, c.name) for c in data.categories] == [(3, "rectangle"), (7, "ellipse"), (12, "triangle")]
    raw = json.loads((tmp_path / "annotations.json").read_text())
    by_image = {}
    for ann in raw["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann["category_id"])
    for record in data.images:
        ids = [data.categories[label - 1].id for label in record.labels]
        assert sorted(ids) == sorted(by_image[record.image_id])
    assert report.counts["images_used"] == 6
    assert report.counts["boxes_used"] == len(raw["annotations"])


def test_file_name_with_subfolders_and_image_root_detection(tmp_path):
    # file_name "images/x.jpg" relative to the channel root, JSON under annotations/
    make_shapes_dataset(tmp_path, n_images=3, annotation_name="annotations/instances.json")
    found = coco.find_annotation_file(tmp_path, None)
    assert found == tmp_path / "annotations" / "instances.json"
    data, _ = load(tmp_path, "annotations/instances.json")
    assert all(r.path.is_file() for r in data.images)


def test_discovery_errors_name_the_files(tmp_path):
    with pytest.raises(UserInputError, match="no COCO annotation file"):
        coco.find_annotation_file(tmp_path, None)
    make_shapes_dataset(tmp_path, n_images=2)
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(UserInputError, match=r"several JSON files .*annotations.json, other.json.*annotations_file"):
        coco.find_annotation_file(tmp_path, None)
    assert coco.find_annotation_file(tmp_path, "annotations.json") == tmp_path / "annotations.json"
    assert coco.find_annotation_file(tmp_path, None, exclude=["other.json"]) == tmp_path / "annotations.json"
    with pytest.raises(UserInputError, match="annotations_file 'missing.json' was not found"):
        coco.find_annotation_file(tmp_path, "missing.json")


def test_bad_json_is_named(tmp_path):
    (tmp_path / "annotations.json").write_text("{not json")
    with pytest.raises(UserInputError, match=r"annotations.json is not valid JSON \(.* line 1"):
        load(tmp_path)


def test_problems_are_fixed_or_skipped_and_counted(tmp_path):
    coco_dict = make_shapes_dataset(tmp_path, n_images=6)
    images, anns = coco_dict["images"], coco_dict["annotations"]
    Image.new("RGB", (50, 40)).save(tmp_path / "images" / "nosize.jpg")
    images += [
        {"id": 100, "file_name": "images/absent.jpg", "width": 10, "height": 10},
        {"id": 101, "file_name": "../outside.jpg", "width": 10, "height": 10},
        {"id": 102, "file_name": "/etc/passwd", "width": 10, "height": 10},
        {"id": 103, "file_name": "images/nosize.jpg"},  # no width/height: read from the file
        {"id": 1, "file_name": "images/shape_00000.jpg", "width": 320, "height": 240},  # duplicate
    ]
    next_id = 1000
    def ann(**kw):
        nonlocal next_id
        next_id += 1
        return {"id": next_id, "image_id": 2, "category_id": 3, "bbox": [1, 1, 5, 5], **kw}
    anns += [
        ann(bbox=[-10, -10, 40, 40]),          # clipped
        ann(bbox=[10, 10, 0, 5]),              # zero size
        ann(bbox=[5000, 5000, 10, 10]),        # outside
        ann(category_id=999),                  # unknown category
        ann(image_id=424242),                  # unknown image
        ann(iscrowd=1),                        # crowd region
        ann(bbox=[1, 2, 3]),                   # malformed
        {**anns[0]},                            # duplicate annotation id
    ]
    (tmp_path / "annotations.json").write_text(json.dumps(coco_dict))
    data, report = load(tmp_path)
    c = report.counts
    assert c["image_skipped_missing_file"] == 1
    assert c["image_skipped_unsafe_file_name"] == 2
    assert c["image_skipped_duplicate_id"] == 1
    assert c["image_size_read_from_file"] == 1
    assert c["box_clipped_to_image"] == 1
    assert c["box_dropped_zero_or_negative_size"] == 1
    assert c["box_dropped_outside_image"] == 1
    assert c["box_dropped_unknown_category"] == 1
    assert c["box_dropped_unknown_image"] == 1
    assert c["box_dropped_malformed"] == 1
    assert c["box_dropped_duplicate_id"] == 1
    assert c["crowd_regions_ignored"] == 1
    assert c["images_without_boxes_kept_as_negatives"] == 1  # nosize.jpg
    ids = {r.image_id for r in data.images}
    assert 1 not in ids and {100, 101, 102}.isdisjoint(ids) and 103 in ids
    nosize = next(r for r in data.images if r.image_id == 103)
    assert (nosize.width, nosize.height) == (50, 40)
    image2 = next(r for r in data.images if r.image_id == 2)
    assert image2.boxes.min() >= 0 and len(image2.crowd_boxes) == 1
    assert "../outside.jpg" in report.examples["image_skipped_unsafe_file_name"]
    summary = report.summary()
    assert "image_skipped_missing_file=1" in summary and "box_clipped_to_image=1" in summary
    report.write(tmp_path / "report.json")
    assert json.loads((tmp_path / "report.json").read_text())["counts"]["box_dropped_outside_image"] == 1


def test_safe_join_refuses_escapes(tmp_path):
    assert coco.safe_join(tmp_path, "a/b.jpg") == tmp_path / "a" / "b.jpg"
    for bad in ("../x.jpg", "a/../../x.jpg", "/abs.jpg", "..", "", "a\\..\\x.jpg"):
        assert coco.safe_join(tmp_path, bad) is None


def test_random_split_is_seeded_and_disjoint(tmp_path):
    make_shapes_dataset(tmp_path, n_images=20)
    data, report = load(tmp_path)
    train, val = coco.split_records(data.images, split_file=None, val_fraction=0.25, seed=5, report=report)
    again, _ = coco.split_records(data.images, split_file=None, val_fraction=0.25, seed=5, report=report)
    other, _ = coco.split_records(data.images, split_file=None, val_fraction=0.25, seed=6, report=report)
    assert len(val) == 5 and len(train) == 15
    assert {r.image_id for r in train}.isdisjoint({r.image_id for r in val})
    assert [r.image_id for r in train] == [r.image_id for r in again]
    assert [r.image_id for r in train] != [r.image_id for r in other]


def _sm_tree(tmp_path: Path, hyperparameters: dict) -> Paths:
    paths = Paths(tmp_path)
    make_shapes_dataset(paths.channel("training"), n_images=10)
    paths.input_config.mkdir(parents=True)
    paths.hyperparameters_file.write_text(json.dumps(hyperparameters))
    return paths


def test_split_file_is_honoured_and_not_taken_for_annotations(tmp_path):
    paths = _sm_tree(tmp_path, {"split_file": "split.json"})
    (paths.channel("training") / "split.json").write_text(json.dumps({"train": [1, 2, 3, 4, 5, 6], "val": [7, 8, 999]}))
    env = read_environment(paths)
    report = DataReport()
    categories, train, val = prepare_data(env, parse_hyperparameters(env.hyperparameters), report)
    assert [r.image_id for r in train] == [1, 2, 3, 4, 5, 6]
    assert [r.image_id for r in val] == [7, 8]
    assert report.counts["split_ids_not_usable"] == 1
    assert report.counts["split_images_in_neither_list"] == 2
    assert report.split["how"] == "split file split.json"


def test_validation_channel_uses_training_categories(tmp_path):
    paths = _sm_tree(tmp_path, {})
    make_shapes_dataset(paths.channel("validation"), n_images=4, seed=3)
    env = read_environment(paths)
    report = DataReport()
    categories, train, val = prepare_data(env, parse_hyperparameters({}), report)
    assert (len(train), len(val)) == (10, 4)
    assert report.split["how"] == "validation channel"


def test_num_classes_counts_background_or_not(tmp_path):
    paths = _sm_tree(tmp_path, {})
    env = read_environment(paths)
    for ok in ("3", "4"):
        prepare_data(env, parse_hyperparameters({"num_classes": ok}), DataReport())
    with pytest.raises(UserInputError) as info:
        prepare_data(env, parse_hyperparameters({"num_classes": "5"}), DataReport())
    assert "'num_classes' is 5 but the data has 3 categories (3: rectangle, 7: ellipse, 12: triangle)" in str(info.value)


def test_nothing_usable_fails_clearly(tmp_path):
    paths = _sm_tree(tmp_path, {})
    for jpg in (paths.channel("training") / "images").glob("*.jpg"):
        jpg.unlink()
    env = read_environment(paths)
    with pytest.raises(UserInputError, match="no usable training image with boxes .*image_skipped_missing_file=10"):
        prepare_data(env, parse_hyperparameters({}), DataReport())


def test_pipe_mode_is_refused(tmp_path):
    paths = _sm_tree(tmp_path, {})
    paths.input_data_config_file.write_text(json.dumps({"training": {"TrainingInputMode": "Pipe"}}))
    with pytest.raises(UserInputError, match="channel 'training' uses Pipe input mode.*File or FastFile"):
        read_environment(paths)


def test_boxes_are_float_xyxy(tmp_path):
    make_shapes_dataset(tmp_path, n_images=2)
    data, _ = load(tmp_path)
    record = data.images[0]
    assert record.boxes.dtype == np.float32 and record.boxes.shape[1] == 4
    assert (record.boxes[:, 2] > record.boxes[:, 0]).all()
