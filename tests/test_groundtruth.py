"""Ground Truth manifests (File/FastFile) and augmented manifests streamed in Pipe mode.

The datasets are generated (Pillow shapes) and written as the documented shapes
(shared/docs/annotation-formats.md); the Pipe tests write real FIFOs in RecordIO framing from
threads, as SageMaker's pipe does.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST, model_files, run_train

from sm_effdet.data.formats import Category, DataReport, coco, groundtruth, pipe, read_dataset
from sm_effdet.data.formats.image_records import coco_records
from sm_effdet.demo import make_shapes_dataset
from sm_effdet.environment import Paths, read_input_data_config
from sm_effdet.errors import UserInputError
from sm_effdet.hyperparameters import parse_hyperparameters

ATTRIBUTE = "shapes-job"
BUCKET = "s3://labels-bucket/jobs/shapes"


def box_line(ref: str, width, height, boxes, class_map, attribute=ATTRIBUTE, **extra) -> dict:
    """One output-manifest line as a bounding-box labelling job writes it."""
    return {
        "source-ref": ref,
        attribute: {
            "image_size": [{"width": width, "height": height, "depth": 3}],
            "annotations": [
                {"class_id": c, "left": x, "top": y, "width": w, "height": h} for c, (x, y, w, h) in boxes
            ],
        },
        f"{attribute}-metadata": {
            "objects": [{"confidence": 0.9} for _ in boxes], "class-map": class_map,
            "type": "groundtruth/object-detection", "human-annotated": "yes",
            "creation-date": "2026-01-01T00:00:00.000000", "job-name": f"labeling-job/{attribute}",
        },
        **extra,
    }


def coco_as_manifest(coco_dict: dict, class_ids: dict | None = None) -> list[dict]:
    """The lines a labelling job would have written for a COCO dataset; `class_ids` renumbers
    the categories (Ground Truth numbers classes from 0)."""
    names = {c["id"]: c["name"] for c in coco_dict["categories"]}
    class_ids = class_ids or {k: k for k in names}
    lines = []
    for image in coco_dict["images"]:
        own = [a for a in coco_dict["annotations"] if a["image_id"] == image["id"]]
        boxes = [(class_ids[a["category_id"]], a["bbox"]) for a in own]
        class_map = {str(class_ids[a["category_id"]]): names[a["category_id"]] for a in own}
        lines.append(box_line(f"{BUCKET}/{image['file_name']}", image["width"], image["height"],
                              boxes, class_map))
    return lines


def write_lines(path: Path, lines: list, newline: str = "\n") -> Path:
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + newline for l in lines))
    return path


def shapes_with_negatives(folder: Path, n_images: int, seed: int = 0) -> dict:
    """A shapes dataset with float boxes and two images without objects."""
    data = make_shapes_dataset(folder, n_images=n_images, seed=seed)
    for a in data["annotations"]:
        a["bbox"] = [v + 0.37 for v in a["bbox"][:2]] + [v - 0.25 for v in a["bbox"][2:]]
    negatives = {data["images"][0]["id"], data["images"][1]["id"]}
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] not in negatives]
    (folder / "annotations.json").write_text(json.dumps(data))
    return data


def read(channel: Path, report: DataReport | None = None, categories=None, **hp):
    return groundtruth.read(channel, parse_hyperparameters(hp), report or DataReport(), categories)


def test_the_same_dataset_as_coco_and_as_a_manifest_gives_the_same_records(tmp_path):
    coco_channel, gt_channel = tmp_path / "coco", tmp_path / "gt"
    data = shapes_with_negatives(coco_channel, 12)
    shutil.copytree(coco_channel / "images", gt_channel / "images")
    # Ground Truth numbers classes from 0, the COCO file from 3: names carry the classes over.
    renumber = {c["id"]: k for k, c in enumerate(data["categories"])}
    write_lines(gt_channel / "output.manifest", coco_as_manifest(data, renumber))

    from_coco = coco.load_coco(coco_channel, coco_channel / "annotations.json", DataReport())
    from_gt = read(gt_channel)
    assert [c.name for c in from_gt.categories] == [c.name for c in from_coco.categories]
    assert [c.id for c in from_gt.categories] == [0, 1, 2]
    by_name = {r.file_name: r for r in from_gt.images}
    assert sorted(by_name) == sorted(r.file_name for r in from_coco.images)
    negatives = 0
    for expected in from_coco.images:
        got = by_name[expected.file_name]
        assert (got.width, got.height) == (expected.width, expected.height)
        assert got.labels.tolist() == expected.labels.tolist()
        np.testing.assert_allclose(got.boxes, expected.boxes, atol=0.5)
        assert got.path == gt_channel / expected.file_name
        negatives += not len(got.labels)
    assert negatives == 2

    # The same split rules: the same images held out by the seeded random split.
    hp = parse_hyperparameters({"val_fraction": "0.25"})
    coco_set = read_dataset({"training": coco_channel}, hp, DataReport())
    gt_set = read_dataset({"training": gt_channel}, hp, DataReport())
    assert [r.file_name for r in gt_set.val] == [r.file_name for r in coco_set.val]


def test_edge_cases_are_read_skipped_and_counted(tmp_path):
    channel = tmp_path / "gt"
    make_shapes_dataset(channel, n_images=6)
    (channel / "annotations.json").unlink()
    (channel / "other").mkdir()
    shutil.copy(channel / "images/shape_00004.jpg", channel / "other/shape_00004.jpg")
    ref = f"{BUCKET}/images/shape_{{:05d}}.jpg".format
    verify = {  # a verification job chained after the labelling job adds its own pair
        "shapes-verify": 0,
        "shapes-verify-metadata": {"class-name": "good", "type": "groundtruth/label-verification"},
    }
    lines = [
        # class_id as text, float coordinates, a class-map listing only this line's class
        box_line(ref(0), 240, 320, [("3", (10.25, 20.5, 50.75, 40.125))], {"3": "circle"}, **verify),
        # the type with an underscore; another sparse class-map: the union is taken
        {**box_line(ref(1), 320, 240, [(0, (5, 5, 30, 30)), (3, (40, 40, 20, 20))], {"0": "square"}),
         f"{ATTRIBUTE}-metadata": {"class-map": {"0": "square"}, "type": "groundtruth/object_detection"}},
        "",  # a blank line
        box_line(ref(2), 320, 240, [], {}),  # no object: a negative
        {"source-ref": ref(3)},  # not labelled yet
        {"source-ref": ref(3), f"{ATTRIBUTE}-metadata": {"failure-reason": "ClientError: worker timed out"}},
        '{"source-ref": "s3://labels-bucket/jobs/shapes/images/broken.jpg", ',  # cut short
        box_line(f"{BUCKET}/images/missing.jpg", 320, 240, [(0, (1, 1, 9, 9))], {"0": "square"}),
        box_line(f"{BUCKET}/images/../../../outside.jpg", 320, 240, [(0, (1, 1, 9, 9))], {"0": "square"}),
        # found under other/ and images/ by name, not by its path: ambiguous
        box_line(f"{BUCKET}/elsewhere/shape_00004.jpg", 320, 240, [(0, (1, 1, 9, 9))], {"0": "square"}),
        # found by its unique file name under images/
        box_line(f"{BUCKET}/elsewhere/shape_00005.jpg", 320, 240, [(0, (1, 1, 9, 9))], {"0": "square"}),
    ]
    manifest = channel / "output.manifest"
    manifest.write_bytes(b"\xef\xbb\xbf" + write_lines(tmp_path / "m", lines, "\r\n").read_bytes())
    report = DataReport()
    data = read(channel, report)

    assert [(c.id, c.name) for c in data.categories] == [(0, "square"), (3, "circle")]
    records = {r.file_name: r for r in data.images}
    assert sorted(records) == ["images/shape_00000.jpg", "images/shape_00001.jpg",
                               "images/shape_00002.jpg", "images/shape_00005.jpg"]
    first = records["images/shape_00000.jpg"]
    assert first.labels.tolist() == [2]
    np.testing.assert_allclose(first.boxes, [[10.25, 20.5, 61.0, 60.625]])
    assert records["images/shape_00001.jpg"].labels.tolist() == [1, 2]
    assert len(records["images/shape_00002.jpg"].labels) == 0
    counts = report.counts
    assert counts["images_listed"] == 10 and counts["images_used"] == 4
    assert counts["image_skipped_not_labelled"] == 1
    assert counts["image_skipped_labelling_failed"] == 1
    assert counts["image_skipped_unreadable_manifest_line"] == 1
    assert report.examples["image_skipped_unreadable_manifest_line"][0].startswith("output.manifest line 7:")
    assert counts["image_skipped_missing_file"] == 1
    assert counts["image_skipped_unsafe_file_name"] == 1
    assert counts["image_skipped_ambiguous_file_name"] == 1
    assert "images/shape_00004.jpg" in report.examples["image_skipped_ambiguous_file_name"][0]
    assert counts["images_without_boxes_kept_as_negatives"] == 1
    assert "failure-reason" not in report.summary() and "image_skipped_labelling_failed=1" in report.summary()


def test_several_label_attributes_are_listed_and_one_can_be_named(tmp_path):
    channel = tmp_path / "gt"
    make_shapes_dataset(channel, n_images=2)
    first = box_line(f"{BUCKET}/images/shape_00000.jpg", 240, 320, [(0, (1, 1, 20, 20))], {"0": "a"})
    adjusted = box_line(f"{BUCKET}/images/shape_00000.jpg", 240, 320,
                        [(0, (2, 2, 30, 30)), (1, (50, 50, 20, 20))], {"0": "a", "1": "b"},
                        attribute="adjusted-shapes-job")
    write_lines(channel / "output.manifest", [{**first, **adjusted}])
    with pytest.raises(UserInputError, match="several bounding-box label attributes.*'shapes-job'.*"
                       "'adjusted-shapes-job'.*label_attribute"):
        read(channel)
    assert read(channel, label_attribute="adjusted-shapes-job").images[0].labels.tolist() == [1, 2]
    with pytest.raises(UserInputError, match="'label_attribute' is 'nope'.*found: 'shapes-job'"):
        read(channel, label_attribute="nope")


def test_files_of_one_name_in_several_folders_follow_the_s3_folders(tmp_path):
    channel = tmp_path / "gt"
    make_shapes_dataset(channel / "data", n_images=2)
    for kind in ("cats", "dogs"):
        (channel / "data" / kind).mkdir()
        shutil.copy(channel / "data/images/shape_00000.jpg", channel / "data" / kind / "1.jpg")
    write_lines(channel / "output.manifest", [
        box_line("s3://b/cats/1.jpg", 240, 320, [(0, (1, 1, 20, 20))], {"0": "cat"}),
        # a class the boxes use that no class-map names: kept under its id, counted
        box_line("s3://b/dogs/1.jpg", 240, 320, [(5, (1, 1, 20, 20))], {}),
    ])
    report = DataReport()
    data = read(channel, report)
    assert sorted(r.file_name for r in data.images) == ["data/cats/1.jpg", "data/dogs/1.jpg"]
    assert [(c.id, c.name) for c in data.categories] == [(0, "cat"), (5, "5")]
    assert report.counts["category_not_in_any_class_map"] == 1


def test_a_cached_stream_without_metadata_names_classes_by_id(tmp_path):
    # A regular file in the FIFO's place (a local run) is read the same way.
    source_channel = tmp_path / "labelled"
    data = make_shapes_dataset(source_channel, n_images=3)
    lines = coco_as_manifest(data)
    source = tmp_path / "training_0"
    source.write_bytes(pipe_stream(source_channel, lines, ATTRIBUTE))
    folder = pipe.cache_channel(source, tmp_path / "cache" / "training", "training", "label")
    assert folder == tmp_path / "cache" / "training" and not (tmp_path / "cache" / "training.partial").exists()
    records = read(folder).images
    assert [r.file_name for r in records] == ["000001.jpg", "000002.jpg", "000003.jpg"]
    assert [c.name for c in read(folder).categories] == ["3", "7", "12"]
    expected = coco_records(source_channel, data, source_channel / "x", DataReport()).images
    for got, want in zip(records, expected):
        np.testing.assert_allclose(got.boxes, want.boxes, atol=0.5)
        assert (got.width, got.height) == (want.width, want.height)
    # Found cached (as Lightning's DDP processes find it): the stream is not read again.
    source.unlink()
    assert pipe.cache_channel(source, folder, "training", "label") == folder


def test_a_line_with_two_objects_is_one_unreadable_line(tmp_path):
    channel = tmp_path / "gt"
    make_shapes_dataset(channel, n_images=1)
    good = box_line(f"{BUCKET}/images/shape_00000.jpg", 240, 320, [(0, (1, 1, 20, 20))], {"0": "a"})
    two = json.dumps({"source-ref": "s3://b/x.jpg"}) + ", " + json.dumps({"source-ref": "s3://b/y.jpg"})
    write_lines(channel / "output.manifest", [good, two])
    report = DataReport()
    assert len(read(channel, report).images) == 1
    assert report.examples["image_skipped_unreadable_manifest_line"] == ["output.manifest line 2: Extra data"]


def test_discovery_and_bad_files_are_named(tmp_path):
    channel = tmp_path / "gt"
    channel.mkdir()
    assert groundtruth.find(channel) == []
    write_lines(channel / "a.manifest", [{"source-ref": "s3://b/x.jpg", "label": 1}])
    with pytest.raises(UserInputError, match="a.manifest has no bounding-box label"):
        read(channel)
    write_lines(channel / "b.jsonl", [])
    with pytest.raises(UserInputError, match=r"several manifests .*\(a.manifest, b.jsonl\).*annotations_file"):
        read(channel)


def test_validation_manifest_matches_classes_by_name(tmp_path):
    train_channel, val_channel = tmp_path / "train", tmp_path / "val"
    train = make_shapes_dataset(train_channel, n_images=6)
    val = make_shapes_dataset(val_channel, n_images=3, seed=1)
    names = [c["id"] for c in train["categories"]]
    write_lines(train_channel / "train.manifest", coco_as_manifest(train, {c: k for k, c in enumerate(names)}))
    # A second labelling job numbered the same classes the other way round.
    write_lines(val_channel / "val.manifest", coco_as_manifest(val, {c: 9 - k for k, c in enumerate(names)}))
    for path in (train_channel / "annotations.json", val_channel / "annotations.json"):
        path.unlink()
    report = DataReport()
    dataset = read_dataset({"training": train_channel, "validation": val_channel},
                           parse_hyperparameters({}), report)
    val_coco = coco_records(val_channel, val, val_channel / "x", DataReport(),
                            [Category(c["id"], c["name"]) for c in train["categories"]])
    expected = {r.file_name: r.labels.tolist() for r in val_coco.images}
    assert {r.file_name: r.labels.tolist() for r in dataset.val} == expected
    assert set(report.channels) == {"training", "validation"}


# ------------------------------------------------------------------ Pipe mode: RecordIO and FIFOs


def recordio(payload: bytes, split_at: int | None = None) -> bytes:
    """One record as SageMaker's pipe frames it; `split_at` writes it in two parts around a
    magic word, as dmlc-core's writer does for a payload that contains one."""
    def part(flag: int, data: bytes) -> bytes:
        return struct.pack("<II", pipe.MAGIC, flag << 29 | len(data)) + data + b"\0" * (-len(data) % 4)

    if split_at is None:
        return part(0, payload)
    return part(1, payload[:split_at]) + part(3, payload[split_at + 4:])


def pipe_stream(channel: Path, lines: list[dict], attribute: str, metadata: bool = False) -> bytes:
    """What SageMaker streams for AttributeNames ["source-ref", attribute(, attribute-metadata)]."""
    stream = b""
    for line in lines:
        relative = line["source-ref"][len(BUCKET) + 1:]
        stream += recordio((channel / relative).read_bytes()) + recordio(json.dumps(line[attribute]).encode())
        if metadata:
            stream += recordio(json.dumps(line[f"{attribute}-metadata"]).encode())
    return stream


def test_recordio_parts_are_joined_and_bad_streams_named(tmp_path):
    payload = b"abcd" + pipe.MAGIC_BYTES + b"efghij"
    source = tmp_path / "training_0"
    source.write_bytes(recordio(b"x") + recordio(payload, split_at=4) + recordio(b"last"))
    with open(source, "rb") as f:
        assert list(pipe.read_records(f, source)) == [b"x", payload, b"last"]
    source.write_bytes(recordio(b"whole")[:-3])
    with open(source, "rb") as f, pytest.raises(UserInputError, match="ends inside a RecordIO record at byte 0"):
        list(pipe.read_records(f, source))
    source.write_bytes(b'{"source-ref": "s3://b/a.jpg"}\n')
    with open(source, "rb") as f, pytest.raises(UserInputError, match="is not RecordIO.*RecordWrapperType"):
        list(pipe.read_records(f, source))


def test_a_fifo_nobody_writes_fails_in_bounded_time(tmp_path, monkeypatch):
    monkeypatch.setenv(pipe.WAIT_VARIABLE, "1")
    fifo = tmp_path / "training_0"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(UserInputError, match="nothing was written to .*training_0 within 1 s"):
        pipe.cache_channel(fifo, tmp_path / "cache" / "training", "training", "label")
    assert time.monotonic() - started < 10
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    with pytest.raises(UserInputError, match="training_9 did not appear within 1 s"):
        pipe.cache_channel(tmp_path / "training_9", tmp_path / "cache" / "training", "training", "label")


def test_a_full_disk_removes_the_cache_and_says_so(tmp_path, monkeypatch):
    channel = tmp_path / "gt"
    data = make_shapes_dataset(channel, n_images=3)
    source = tmp_path / "training_0"
    source.write_bytes(pipe_stream(channel, coco_as_manifest(data), ATTRIBUTE))
    monkeypatch.setenv(pipe.MIN_FREE_VARIABLE, str(10**18))
    with pytest.raises(UserInputError, match="does not fit on the training volume.*VolumeSizeInGB"):
        pipe.cache_channel(source, tmp_path / "cache" / "training", "training", "label")
    assert list((tmp_path / "cache").iterdir()) == []


def test_pipe_channels_with_recordio_pass_the_environment_check(tmp_path):
    paths = Paths(tmp_path)
    paths.input_config.mkdir(parents=True)
    config = {"training": {"TrainingInputMode": "Pipe", "RecordWrapperType": "RecordIO",
                           "S3DistributionType": "FullyReplicated"}}
    paths.input_data_config_file.write_text(json.dumps(config))
    assert read_input_data_config(paths.input_data_config_file) == config
    config["training"]["RecordWrapperType"] = "None"
    paths.input_data_config_file.write_text(json.dumps(config))
    with pytest.raises(UserInputError, match="uses Pipe input mode.*File or FastFile.*AugmentedManifestFile"):
        read_input_data_config(paths.input_data_config_file)


# ------------------------------------------------------------------ real ./train runs


def write_config(base: Path, hyperparameters: dict, channels: dict) -> None:
    config = base / "input" / "config"
    config.mkdir(parents=True, exist_ok=True)
    (config / "hyperparameters.json").write_text(json.dumps(hyperparameters))
    (config / "inputdataconfig.json").write_text(json.dumps(channels))


def test_train_on_a_manifest_channel(tmp_path):
    base = tmp_path / "opt_ml"
    channel = base / "input" / "data" / "training"
    data = shapes_with_negatives(channel, 16)
    (channel / "annotations.json").unlink()
    write_lines(channel / "output.manifest", coco_as_manifest(data, {3: 0, 7: 1, 12: 2}))
    write_config(base, {**FAST, "val_fraction": "0.25"}, {"training": {"TrainingInputMode": "File"}})
    out = run_train(base)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "model.json" in model_files(base)
    card = json.loads((base / "model" / "model.json").read_text())
    classes = card.get("categories") or card.get("classes")
    assert [(c["id"], c["name"]) for c in classes] == [(0, "rectangle"), (1, "ellipse"), (2, "triangle")]
    report = json.loads((base / "output" / "data" / "data_report.json").read_text())
    assert report["channels"]["training"]["images_without_boxes_kept_as_negatives"] == 2
    assert report["sources"] == [str(channel / "output.manifest")]


class FifoWriter(threading.Thread):
    """SageMaker's side of a Pipe channel: open the FIFO for writing (blocking until the job
    opens it for reading), write the stream, close. `opened` tells whether anyone read."""

    def __init__(self, fifo: Path, data: bytes):
        super().__init__(daemon=True)
        self.fifo, self.data, self.opened = fifo, data, False
        os.mkfifo(fifo)

    def run(self) -> None:
        try:
            with open(self.fifo, "wb") as f:
                self.opened = True
                f.write(self.data)
        except BrokenPipeError:
            pass

    def release(self) -> None:
        """Unblock a writer nobody opened (a reader that closes at once)."""
        if self.is_alive():
            os.close(os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK))
            self.join(5)


def test_train_in_pipe_mode_reads_epoch_0_once_and_trains_from_disk(tmp_path):
    base = tmp_path / "opt_ml"
    data_dir = base / "input" / "data"
    source = tmp_path / "labelled"
    data = shapes_with_negatives(source, 16)
    lines = coco_as_manifest(data, {3: 0, 7: 1, 12: 2})
    # Validation: a File-mode manifest channel whose classes are numbered the other way round.
    validation = data_dir / "validation"
    val = make_shapes_dataset(validation, n_images=4, seed=1)
    (validation / "annotations.json").unlink()
    write_lines(validation / "validation.manifest", coco_as_manifest(val, {3: 2, 7: 1, 12: 0}))
    write_config(
        base, {**FAST, "epochs": "2", "label_attribute": ATTRIBUTE},
        {"training": {"TrainingInputMode": "Pipe", "RecordWrapperType": "RecordIO",
                      "S3DistributionType": "FullyReplicated"},
         "validation": {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated"}},
    )
    epoch0 = FifoWriter(data_dir / "training_0", pipe_stream(source, lines, ATTRIBUTE, metadata=True))
    epoch1 = FifoWriter(data_dir / "training_1", b"")
    epoch0.start()
    epoch1.start()
    try:
        out = run_train(base, SM_EFFDET_PIPE_WAIT_SECONDS="120")
    finally:
        opened_later = epoch1.opened
        epoch0.release()
        epoch1.release()
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert epoch0.opened and not opened_later
    assert "Pipe channel 'training': cached 16 images (48 RecordIO records," in log
    cache = base / "input" / "pipe-cache" / "training"
    assert len(list(cache.glob("*.jpg"))) == 16 and (cache / pipe.MANIFEST_NAME).is_file()
    card = json.loads((base / "model" / "model.json").read_text())
    classes = card.get("categories") or card.get("classes")
    assert [(c["id"], c["name"]) for c in classes] == [(0, "rectangle"), (1, "ellipse"), (2, "triangle")]
    report = json.loads((base / "output" / "data" / "data_report.json").read_text())
    assert report["channels"]["training"]["images_used"] == 16
    assert report["channels"]["validation"]["boxes_used"] == sum(1 for _ in val["annotations"])

