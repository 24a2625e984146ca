"""Reading real Ground Truth, CreateML and built-in algorithm exports right (issue 24): classes
of another labelling job matched by name, two S3 refs copied flat as one file, manifests that
are not UTF-8 JSON Lines, CreateML images the JSON does not list, and AWS's own example path
for the built-in format.

Manifests are written as a bounding-box labelling job writes its output manifest, CreateML as
Roboflow exports it, the built-in format as AWS's documentation shows it; images with Pillow.
Expected boxes are the pixel boxes the test wrote; counts are what the test wrote that way.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_formats import read
from test_formats_read import photo

from sm_effdet.errors import UserInputError

BUCKET = "s3://pets-labels/site"
ATTRIBUTE = "pets"


def gt_line(ref: str, size: tuple[int, int], boxes: list, class_map: dict) -> dict:
    """One output-manifest line of a bounding-box labelling job; boxes (class_id, x, y, w, h)."""
    return {
        "source-ref": ref,
        ATTRIBUTE: {
            "image_size": [{"width": size[0], "height": size[1], "depth": 3}],
            "annotations": [{"class_id": c, "left": x, "top": y, "width": w, "height": h}
                            for c, x, y, w, h in boxes],
        },
        f"{ATTRIBUTE}-metadata": {
            "objects": [{"confidence": 0.93} for _ in boxes], "class-map": class_map,
            "type": "groundtruth/object-detection", "human-annotated": "yes",
            "creation-date": "2024-05-02T10:11:12.131415", "job-name": f"labeling-job/{ATTRIBUTE}",
        },
    }


def write_manifest(path: Path, lines: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def xyxy(x, y, w, h) -> list[float]:
    return [x, y, x + w, y + h]


def training_manifest(channel: Path) -> None:
    """Training labelled by a job whose classes are {0: dog, 1: cat}."""
    lines = []
    for k in range(3):
        size = (90 + 10 * k, 70)
        photo(channel / f"t{k}.jpg", size)
        lines.append(gt_line(f"{BUCKET}/train/t{k}.jpg", size, [(0, 5, 6, 30, 20), (1, 40, 30, 25, 25)],
                             {"0": "dog", "1": "cat"}))
    write_manifest(channel / "output.manifest", lines)


# --- item 4: a validation manifest's classes are matched by name --------------------------------

def test_validation_manifest_classes_are_matched_by_name_not_id(tmp_path):
    training, validation = tmp_path / "training", tmp_path / "validation"
    training_manifest(training)
    size = (100, 80)
    photo(validation / "v0.jpg", size)
    photo(validation / "v1.jpg", size)
    bird0, bird1, dog1 = (10, 10, 20, 15), (50, 40, 30, 20), (5, 45, 40, 30)
    write_manifest(validation / "output.manifest", [
        # another job, classes {1: bird}: its id 1 is training's cat
        gt_line(f"{BUCKET}/val/v0.jpg", size, [(1, *bird0)], {"1": "bird"}),
        # and {0: bird, 1: dog}: read by id, two classes would share training's id 0
        gt_line(f"{BUCKET}/val/v1.jpg", size, [(0, *bird1), (1, *dog1)], {"0": "bird", "1": "dog"}),
    ])
    data, report = read({"training": training, "validation": validation})
    assert [(c.id, c.name) for c in data.categories] == [(0, "dog"), (1, "cat")]
    by_name = {Path(r.file_name).stem: r for r in data.val}
    assert len(by_name["v0"].boxes) == 0  # the bird is no cat
    np.testing.assert_allclose(by_name["v1"].boxes, [xyxy(*dog1)])
    assert [data.categories[int(label) - 1].name for label in by_name["v1"].labels] == ["dog"]
    c = report.channels["validation"]
    assert c["category_not_in_training"] == 1 and c["box_dropped_unknown_category"] == 2
    assert report.examples["category_not_in_training"] == [f"validation: {validation / 'output.manifest'}: bird"]
    assert "category_not_in_training=1" in report.summary()


# --- item 5: two refs, one flattened file --------------------------------------------------------

def test_two_refs_resolving_to_one_file_are_refused_both(tmp_path):
    channel = tmp_path / "training"
    size = (120, 90)
    photo(channel / "0001.jpg", size)  # cam1's and cam2's 0001.jpg, copied flat: one file
    photo(channel / "0002.jpg", size)
    kept = (30, 20, 40, 35)
    write_manifest(channel / "output.manifest", [
        gt_line(f"{BUCKET}/cam1/0001.jpg", size, [(0, 5, 5, 20, 20)], {"0": "dog"}),
        gt_line(f"{BUCKET}/cam2/0001.jpg", size, [(0, 60, 40, 30, 30), (0, 1, 1, 9, 9)], {"0": "dog"}),
        gt_line(f"{BUCKET}/cam1/0002.jpg", size, [(0, *kept)], {"0": "dog"}),
    ])
    data, report = read({"training": channel})
    (record,) = data.train
    assert record.file_name == "0002.jpg"
    np.testing.assert_allclose(record.boxes, [xyxy(*kept)])
    c = report.counts
    assert c["image_skipped_ambiguous_file_name"] == 2 and (c["images_listed"], c["boxes_listed"]) == (3, 4)
    assert sorted(report.examples["image_skipped_ambiguous_file_name"]) == [
        f"{BUCKET}/cam1/0001.jpg and {BUCKET}/cam2/0001.jpg all resolve to 0001.jpg",
        f"{BUCKET}/cam2/0001.jpg and {BUCKET}/cam1/0001.jpg all resolve to 0001.jpg",
    ]
    assert "image_skipped_ambiguous_file_name=2" in report.summary()


# --- item 11: a manifest that is not UTF-8 JSON Lines ---------------------------------------------

def _one_image(channel: Path) -> list[dict]:
    photo(channel / "a.jpg", (60, 50))
    photo(channel / "b.jpg", (60, 50))
    return [gt_line(f"{BUCKET}/{n}.jpg", (60, 50), [(0, 5, 5, 20, 20)], {"0": "dog"}) for n in "ab"]


@pytest.mark.parametrize("encoding, said", [
    ("utf-16", "UTF-16 text (it starts with the UTF-16 byte-order mark)"),
    ("utf-16-le", "UTF-16 or UTF-32 text (it holds NUL bytes), not UTF-8"),
    ("utf-32", "UTF-32 text (it starts with the UTF-32 byte-order mark)"),
])
def test_a_manifest_saved_as_utf16_names_its_encoding(tmp_path, encoding, said):
    channel = tmp_path / "training"
    lines = _one_image(channel)
    manifest = channel / "output.manifest"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding=encoding)
    with pytest.raises(UserInputError) as failure:
        read({"training": channel})
    assert str(failure.value) == (f"manifest {manifest} is {said}; save it as UTF-8 text, one "
                                  "JSON object per line, as Ground Truth writes it.")


@pytest.mark.parametrize("layout, said", [
    ("pretty", "has no line that is a JSON object (line 1 holds '{': Expecting property name enclosed in double quotes)"),
    ("list", "holds one JSON list of 2 items, not one object per line"),
    ("one object", "holds one JSON object spread over {n} lines"),
])
def test_a_manifest_not_one_object_per_line_names_the_line(tmp_path, layout, said):
    channel = tmp_path / "training"
    lines = _one_image(channel)
    manifest = channel / "output.manifest"
    text = {"pretty": "\n".join(json.dumps(line, indent=2) for line in lines) + "\n",
            "list": json.dumps(lines, indent=1),
            "one object": json.dumps(lines[0], indent=2)}[layout]
    manifest.write_text(text)
    with pytest.raises(UserInputError) as failure:
        read({"training": channel})
    said = said.replace("{n}", str(text.count("\n") + 1))
    assert str(failure.value) == (
        f"manifest {manifest} {said}; a manifest holds one JSON object per line (JSON Lines), as "
        "Ground Truth writes it: write each image's object on a line of its own.")


# --- item 14: CreateML images the JSON does not list ---------------------------------------------

def test_createml_images_the_json_does_not_list_are_counted(tmp_path):
    channel = tmp_path / "training"
    folder = channel / "train"  # Roboflow's CreateML export: the JSON beside the images
    listed = {"a_jpg.rf.01.jpg": ((80, 60), (12, 8, 30, 20)), "b_jpg.rf.02.jpg": ((90, 70), (40, 30, 24, 16))}
    for name, (size, _) in listed.items():
        photo(folder / name, size)
    photo(folder / "c_jpg.rf.03.jpg", (80, 60))  # labelled nowhere
    (folder / "_annotations.createml.json").write_text(json.dumps([
        {"image": name, "annotations": [{"label": "dog", "coordinates": {
            "x": x + w / 2, "y": y + h / 2, "width": w, "height": h}}]}
        for name, (_, (x, y, w, h)) in listed.items()
    ]))
    data, report = read({"training": channel})
    assert sorted(Path(r.file_name).name for r in data.train) == sorted(listed)
    for r in data.train:
        np.testing.assert_allclose(r.boxes, [xyxy(*listed[Path(r.file_name).name][1])])
    assert report.counts["images_not_in_json_not_used"] == 1
    assert report.examples["images_not_in_json_not_used"] == ["train/c_jpg.rf.03.jpg"]
    assert "images_not_in_json_not_used=1" in report.summary()


# --- item 15: the built-in format's "your_image_directory/..." ----------------------------------

def builtin_json(file: str, size: tuple[int, int], boxes: list) -> str:
    """A per-image JSON as AWS's documentation shows it."""
    return json.dumps({
        "file": file,
        "image_size": [{"width": size[0], "height": size[1], "depth": 3}],
        "annotations": [{"class_id": c, "left": x, "top": y, "width": w, "height": h}
                        for c, x, y, w, h in boxes],
        "categories": [{"class_id": 0, "name": "dog"}, {"class_id": 1, "name": "cat"}],
    })


def test_builtin_file_paths_fall_back_to_the_file_name(tmp_path):
    images, annotations = tmp_path / "train", tmp_path / "train_annotation"
    size, boxes = (500, 400), [(0, 111, 134, 61, 128), (1, 200, 50, 100, 90)]
    photo(images / "sample_image1.jpg", size)
    annotations.mkdir()
    (annotations / "sample_image1.json").write_text(
        builtin_json("your_image_directory/sample_image1.jpg", size, boxes))
    data, report = read({"train": images, "train_annotation": annotations})
    (record,) = data.train
    assert record.file_name == "sample_image1.jpg"
    np.testing.assert_allclose(record.boxes, [xyxy(*b[1:]) for b in boxes])
    assert [data.categories[int(label) - 1].name for label in record.labels] == ["dog", "cat"]
    assert report.examples["image_found_by_file_name"] == [
        "train_annotation: your_image_directory/sample_image1.jpg -> sample_image1.jpg"]
    assert "image_found_by_file_name=1" in report.summary()

    # Two JSONs whose paths both fall back to one file: neither is used.
    photo(images / "x.jpg", size)
    for k, folder in enumerate(("day", "night")):
        (annotations / f"x_{folder}.json").write_text(builtin_json(f"{folder}/x.jpg", size, boxes[k:k + 1]))
    data, report = read({"train": images, "train_annotation": annotations})
    assert [r.file_name for r in data.train] == ["sample_image1.jpg"]
    assert report.counts["image_skipped_ambiguous_file_name"] == 2
    assert report.counts["images_listed"] == 3
