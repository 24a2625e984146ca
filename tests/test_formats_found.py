"""Annotations found by content, wherever real exports put them (issue 24: items 1, 8, 9, 10,
13, 16).

Each export is written the way its tool writes it: LabelImg's VOC and YOLO, CVAT's (datumaro's)
Pascal VOC 1.1 and YOLO 1.1, Roboflow's / Ultralytics' coco128 data.yaml, Label Studio's JSON
export; images with Pillow. Boxes are checked in pixels against values computed here from the
boxes written, by each format's documented rule. Reader calls only: no training.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from PIL import Image
from test_formats import read as read_channels

from sm_effdet.data.formats import common, scan
from sm_effdet.data.formats.image_records import DataReport as Report
from sm_effdet.errors import UserInputError

RACCOON = REPO.parent / "shared" / "data" / "raccoon"
if not RACCOON.is_dir():  # a worktree sits one level deeper than the main checkout
    RACCOON = REPO.parents[1] / "shared" / "data" / "raccoon"


def read(channel: Path, **values):
    return read_channels({"training": channel}, **values)


def boxes_by_file(data) -> dict[str, list[tuple[str, list[float]]]]:
    """{file_name: [(class name, [x1, y1, x2, y2]), ...]} over train and val, sorted."""
    names = [c.name for c in data.categories]
    return {r.file_name: sorted((names[int(label) - 1], [float(v) for v in box])
                                for box, label in zip(r.boxes, r.labels))
            for r in data.train + data.val}


def image(path: Path, size=(64, 48)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, "gray").save(path)


# --- the tools' writers -----------------------------------------------------------------------

def labelimg_xml(folder: str, filename: str, size: tuple[int, int], objects: list) -> str:
    """LabelImg's PascalVocWriter: lxml pretty-printed with tabs, no XML declaration; integer
    pixel corners (it clamps xmin/ymin to 1)."""
    out = (f"<annotation>\n\t<folder>{folder}</folder>\n\t<filename>{filename}</filename>\n"
           f"\t<path>C:\\Users\\me\\{folder}\\{filename}</path>\n\t<source>\n\t\t<database>Unknown</database>\n"
           f"\t</source>\n\t<size>\n\t\t<width>{size[0]}</width>\n\t\t<height>{size[1]}</height>\n"
           "\t\t<depth>3</depth>\n\t</size>\n\t<segmented>0</segmented>\n")
    for name, (x1, y1, x2, y2) in objects:
        out += (f"\t<object>\n\t\t<name>{name}</name>\n\t\t<pose>Unspecified</pose>\n"
                "\t\t<truncated>0</truncated>\n\t\t<difficult>0</difficult>\n\t\t<bndbox>\n"
                f"\t\t\t<xmin>{x1}</xmin>\n\t\t\t<ymin>{y1}</ymin>\n\t\t\t<xmax>{x2}</xmax>\n"
                f"\t\t\t<ymax>{y2}</ymax>\n\t\t</bndbox>\n\t</object>\n")
    return out + "</annotation>\n"


def datumaro_xml(item_id: str, size: tuple[int, int], objects: list) -> str:
    """datumaro's VocExporter (CVAT's "PASCAL VOC 1.1"): filename = item id + .jpg, source
    database/annotation/image "Unknown", xmin = x (0-based floats), occluded written, lxml
    pretty_print with two spaces."""
    folder = item_id[: item_id.find("_")] if "_" in item_id else ""
    out = (f"<annotation>\n  <folder>{folder}</folder>\n  <filename>{item_id}.jpg</filename>\n  <source>\n"
           "    <database>Unknown</database>\n    <annotation>Unknown</annotation>\n"
           f"    <image>Unknown</image>\n  </source>\n  <size>\n    <width>{size[0]}</width>\n"
           f"    <height>{size[1]}</height>\n    <depth>3</depth>\n  </size>\n  <segmented>0</segmented>\n")
    for name, (x, y, w, h) in objects:
        out += (f"  <object>\n    <name>{name}</name>\n    <truncated>0</truncated>\n"
                "    <occluded>0</occluded>\n    <difficult>0</difficult>\n    <bndbox>\n"
                f"      <xmin>{float(x)}</xmin>\n      <ymin>{float(y)}</ymin>\n"
                f"      <xmax>{float(x + w)}</xmax>\n      <ymax>{float(y + h)}</ymax>\n"
                "    </bndbox>\n  </object>\n")
    return out + "</annotation>\n"


def yolo_row(class_index: int, box, size) -> str:
    """LabelImg's and datumaro's YOLO row from pixel corners: centre and size over the image,
    six decimals."""
    (x1, y1, x2, y2), (w, h) = box, size
    return "%d %.6f %.6f %.6f %.6f\n" % (class_index, (x1 + x2) / 2 / w, (y1 + y2) / 2 / h,
                                         (x2 - x1) / w, (y2 - y1) / h)


def voc_1_based(box) -> list[float]:
    """The VOC devkit's 1-based inclusive corners as 0-based pixels: xmin - 1 .. xmax."""
    x1, y1, x2, y2 = box
    return [x1 - 1.0, y1 - 1.0, float(x2), float(y2)]


# --- item 1: Pascal VOC found by content, anywhere -----------------------------------------------

@pytest.mark.parametrize("layout", ["beside images", "annots", "xml", "labels", "upper-case .XML",
                                    "UTF-16 with BOM", "deep folders"])
def test_voc_xmls_are_found_wherever_the_tools_save_them(tmp_path, layout):
    ch = tmp_path / "training"
    boxes = {"a": [("cat", (5, 6, 30, 40))], "b": [("dog", (1, 1, 64, 48)), ("cat", (10, 12, 20, 22))]}
    xml_folder = {"beside images": "images", "annots": "annots", "xml": "xml", "labels": "labels",
                  "upper-case .XML": "Annotations", "UTF-16 with BOM": "annotations",
                  "deep folders": "export/2024/site1/voc"}[layout]
    for stem, objects in boxes.items():
        image(ch / "images" / f"{stem}.jpg")
        text = labelimg_xml("images", f"{stem}.jpg", (64, 48), objects)
        suffix = ".XML" if layout == "upper-case .XML" else ".xml"
        target = ch / xml_folder / f"{stem}{suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        if layout == "UTF-16 with BOM":  # a Windows tool's XML
            target.write_bytes(('<?xml version="1.0" encoding="utf-16"?>\n' + text).encode("utf-16"))
        else:
            target.write_text(text)
    data, report = read(ch)
    assert report.formats == {"training": "voc"}
    assert boxes_by_file(data) == {
        f"images/{stem}.jpg": sorted((name, voc_1_based(box)) for name, box in objects)
        for stem, objects in boxes.items()}
    assert report.counts["images_used"] == 2


def test_raccoon_photographs_read_in_their_layout_and_with_xmls_beside_them(tmp_path):
    if not RACCOON.is_dir():
        pytest.skip("the shared raccoon photographs are not on this machine")
    stems = sorted(p.stem for p in (RACCOON / "annotations").glob("*.xml"))[:6]
    own, beside = tmp_path / "own", tmp_path / "beside"
    for stem in stems:
        for ch in (own, beside):
            (ch / "images").mkdir(parents=True, exist_ok=True)
            shutil.copy(RACCOON / "images" / f"{stem}.jpg", ch / "images")
        (own / "annotations").mkdir(exist_ok=True)
        shutil.copy(RACCOON / "annotations" / f"{stem}.xml", own / "annotations")
        shutil.copy(RACCOON / "annotations" / f"{stem}.xml", beside / "images")  # LabelImg's habit
    expected = {}
    for stem in stems:  # the XMLs read here with ElementTree, by the 1-based rule
        root = ET.parse(RACCOON / "annotations" / f"{stem}.xml").getroot()
        expected[f"images/{stem}.jpg"] = sorted(
            (o.findtext("name"), voc_1_based([float(o.find("bndbox").findtext(k))
                                              for k in ("xmin", "ymin", "xmax", "ymax")]))
            for o in root.iter("object"))
    for ch in (own, beside):
        data, report = read(ch)
        assert report.formats == {"training": "voc"} and report.counts["images_used"] == len(stems)
        got = boxes_by_file(data)
        assert got.keys() == expected.keys()
        for name, objects in expected.items():
            assert [n for n, _ in got[name]] == [n for n, _ in objects]
            np.testing.assert_allclose([b for _, b in got[name]], [b for _, b in objects], atol=1e-4)


# --- items 1, 9, 10: CVAT's Pascal VOC (datumaro's writer) -------------------------------------

def write_cvat_voc(ch: Path, items: dict[str, list], subsets: dict[str, list[str]] | None) -> None:
    """CVAT's "PASCAL VOC 1.1" export: Annotations/<id>.xml (nested for ids with folders),
    JPEGImages/<id>.jpg, labelmap.txt, ImageSets/Main/<Subset>.txt and per-class lists."""
    labels = sorted({name for objects in items.values() for name, _ in objects})
    for item_id, objects in items.items():
        image(ch / "JPEGImages" / f"{item_id}.jpg", (80, 60))
        xml = ch / "Annotations" / f"{item_id}.xml"
        xml.parent.mkdir(parents=True, exist_ok=True)
        xml.write_text(datumaro_xml(item_id, (80, 60), objects))
    (ch / "labelmap.txt").write_text("# label:color_rgb:parts:actions\nbackground:0,0,0::\n"
                                     + "".join(f"{n}:{40 * k},{200 - 40 * k},83::\n" for k, n in enumerate(labels)))
    main = ch / "ImageSets" / "Main"
    main.mkdir(parents=True)
    for subset, ids in (subsets or {"default": list(items)}).items():
        (main / f"{subset}.txt").write_text("".join(f"{i}\n" for i in ids))
        for label in labels:  # the classification lists: not splits
            (main / f"{label}_{subset}.txt").write_text("".join(f"{i} -1\n" for i in ids))
    for folder in ("SegmentationClass", "SegmentationObject"):
        (ch / folder).mkdir()


def test_cvat_voc_nested_item_ids_0_based_boxes_and_subset_lists(tmp_path):
    ch = tmp_path / "training"
    items = {  # two items share a stem in different folders: each XML must find its own image
        "site1/frame_000001": [("car", (10, 20, 30, 15))],
        "site2/frame_000001": [("person", (0, 0, 8.5, 20.25))],
        "site2/frame_000002": [("car", (40, 30, 39, 29)), ("person", (5, 5, 10, 10))],
    }
    write_cvat_voc(ch, items, {"Train": ["site1/frame_000001", "site2/frame_000002"],
                               "Validation": ["site2/frame_000001"]})
    data, report = read(ch, val_fraction=0.5)
    assert report.formats == {"training": "voc"}
    # datumaro writes xmin = x: the boxes are read as written, not shifted by the 1-based rule
    assert boxes_by_file(data) == {
        f"JPEGImages/{i}.jpg": sorted((n, [float(x), float(y), float(x + w), float(y + h)])
                                      for n, (x, y, w, h) in objects)
        for i, objects in items.items()}
    assert report.counts["xml_read_0_based_cvat"] == 3
    assert [c.name for c in data.categories] == ["car", "person"]  # labelmap.txt, background out
    assert report.split["how"] == "VOC ImageSets/Main Train.txt and Validation.txt"
    assert sorted(r.file_name for r in data.train) == ["JPEGImages/site1/frame_000001.jpg",
                                                       "JPEGImages/site2/frame_000002.jpg"]
    assert [r.file_name for r in data.val] == ["JPEGImages/site2/frame_000001.jpg"]


def test_a_labelimg_xml_beside_cvat_ones_keeps_the_1_based_rule(tmp_path):
    ch = tmp_path / "training"
    write_cvat_voc(ch, {"a": [("car", (10, 20, 30, 15))]}, None)
    image(ch / "JPEGImages" / "b.jpg", (80, 60))
    (ch / "Annotations" / "b.xml").write_text(labelimg_xml("JPEGImages", "b.jpg", (80, 60), [("car", (11, 21, 40, 35))]))
    data, report = read(ch)
    assert boxes_by_file(data) == {"JPEGImages/a.jpg": [("car", [10.0, 20.0, 40.0, 35.0])],
                                   "JPEGImages/b.jpg": [("car", voc_1_based((11, 21, 40, 35)))]}
    assert report.counts["xml_read_0_based_cvat"] == 1
    assert report.split == {"how": "random, val_fraction=0.0, seed=42", "train": 2, "val": 0}  # default.txt: no split


# --- item 1: YOLO as CVAT and LabelImg write it ------------------------------------------------

def write_cvat_yolo(ch: Path, subsets: dict[str, dict[str, list]], names: list[str]) -> None:
    """CVAT's "YOLO 1.1" export (datumaro's YoloExporter): obj.names, obj.data with data/
    paths, <subset>.txt listing data/obj_<subset>_data/<id>.jpg, labels beside the images."""
    ch.mkdir(parents=True)
    (ch / "obj.names").write_text("".join(f"{n}\n" for n in names))
    data = f"classes = {len(names)}\n"
    for subset, items in subsets.items():
        folder = ch / f"obj_{subset}_data"
        lines = []
        for item_id, objects in items.items():
            image(folder / f"{item_id}.jpg", (80, 60))
            (folder / f"{item_id}.txt").write_text("".join(yolo_row(names.index(n), b, (80, 60)) for n, b in objects))
            lines.append(f"data/obj_{subset}_data/{item_id}.jpg\n")
        (ch / f"{subset}.txt").write_text("".join(lines))
        data += f"{subset} = data/{subset}.txt\n"
    (ch / "obj.data").write_text(data + "names = data/obj.names\nbackup = backup/\n")


def test_cvat_yolo_1_1_is_found_and_its_subsets_are_the_split(tmp_path):
    names = ["car", "person"]
    train = {"f1": [("car", (8, 6, 40, 30))], "f2": [("person", (0, 0, 80, 60)), ("car", (20, 10, 24, 50))]}
    valid = {"f3": [("person", (16, 12, 32, 48))]}
    expected = {f"obj_{s}_data/{i}.jpg": sorted((n, [float(v) for v in b]) for n, b in objects)
                for s, items in (("train", train), ("valid", valid)) for i, objects in items.items()}
    ch = tmp_path / "split"
    write_cvat_yolo(ch, {"train": train, "valid": valid}, names)
    data, report = read(ch)
    assert report.formats == {"training": "yolo"} and report.split["how"] == "obj.data train and val"
    got = boxes_by_file(data)
    assert got.keys() == expected.keys() and [r.file_name for r in data.val] == ["obj_valid_data/f3.jpg"]
    for name, objects in expected.items():
        assert [n for n, _ in got[name]] == [n for n, _ in objects]
        np.testing.assert_allclose([b for _, b in got[name]], [b for _, b in objects], atol=1e-3)
    # CVAT's default: one subset, "train"; its list names every image: val_fraction applies
    only = tmp_path / "default"
    write_cvat_yolo(only, {"train": {**train, **valid}}, names)
    data, report = read(only, val_fraction=0.34)
    assert report.split["how"].startswith("random") and (len(data.train), len(data.val)) == (2, 1)
    forced, report = read(only, annotation_format="yolo")
    assert report.formats == {"training": "yolo"} and len(forced.train) == 3


def test_labelimg_yolo_labels_beside_the_images_with_classes_txt(tmp_path):
    """LabelImg in YOLO mode saves a.txt and classes.txt in the folder of the images."""
    ch = tmp_path / "training"
    names = ["dog", "cat"]  # LabelImg's order: as the classes were first used
    objects = {"a": [("dog", (4, 4, 60, 40))], "b": [("cat", (10, 10, 20, 30)), ("dog", (0, 24, 64, 48))]}
    for stem, boxes in objects.items():
        image(ch / "images" / f"{stem}.jpg")
        (ch / "images" / f"{stem}.txt").write_text("".join(yolo_row(names.index(n), b, (64, 48)) for n, b in boxes))
    image(ch / "images" / "negative.jpg")  # not labelled: no file
    (ch / "images" / "classes.txt").write_text("".join(f"{n}\n" for n in names))
    for fmt in ("auto", "yolo"):
        data, report = read(ch, annotation_format=fmt)
        assert report.formats == {"training": "yolo"}
        assert [(c.id, c.name) for c in data.categories] == [(0, "dog"), (1, "cat")]
        got = boxes_by_file(data)
        assert got["images/negative.jpg"] == [] and report.counts["images_without_label_file"] == 1
        for stem, boxes in objects.items():
            want = sorted((n, [float(v) for v in b]) for n, b in boxes)
            assert [n for n, _ in got[f"images/{stem}.jpg"]] == [n for n, _ in want]
            np.testing.assert_allclose([b for _, b in got[f"images/{stem}.jpg"]], [b for _, b in want], atol=1e-3)


def test_forcing_voc_reads_xmls_beside_the_images(tmp_path):
    ch = tmp_path / "training"
    image(ch / "photos" / "x.jpg")
    (ch / "photos" / "x.xml").write_text(labelimg_xml("photos", "x.jpg", (64, 48), [("cat", (2, 3, 20, 30))]))
    data, report = read(ch, annotation_format="voc")
    assert boxes_by_file(data) == {"photos/x.jpg": [("cat", voc_1_based((2, 3, 20, 30)))]}


# --- item 1: the one walk, its bounds, and what is said when nothing is found ------------------

def test_nothing_found_says_where_the_job_looked_and_what_it_found(tmp_path):
    ch = tmp_path / "training"
    for k in range(4):
        image(ch / "images" / f"{k}.jpg")
    # CVAT for images' own XML: one file, root <annotations>; and a Pascal VOC-looking name
    (ch / "annotations.xml").write_text('<?xml version="1.0" encoding="utf-8"?>\n<annotations>\n'
                                        '  <version>1.1</version>\n</annotations>\n')
    for k in range(2):
        (ch / "xml" / f"{k}.xml").parent.mkdir(exist_ok=True)
        (ch / "xml" / f"{k}.xml").write_text("<svg><rect/></svg>")
    with pytest.raises(UserInputError) as info:
        read(ch)
    text = str(info.value)
    assert text.startswith(f"no COCO annotation file (.json) found at the root of {ch}")
    assert "looked through its 7 files in 3 folders, down to 16 levels" in text
    assert "4 images (.jpg 4)" in text
    assert "3 .xml files, none with an <annotation> root (roots: <svg> 2, <annotations> 1" in text
    assert "<annotations> is CVAT for images' own XML" in text and "annotations_file" in text
    # YOLO labels without a class list: named, with the file names that would make them YOLO
    (ch / "labels").mkdir()
    (ch / "labels" / "0.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    with pytest.raises(UserInputError, match=r"YOLO label files \(such as labels/0.txt\) but no "
                                             r"data.yaml, obj.names nor classes.txt"):
        read(ch)
    with pytest.raises(UserInputError, match=r"annotation_format is 'yolo' but .* does not hold .*"
                                             r"looked through its 8 files.*YOLO label files"):
        read(ch, annotation_format="yolo")


def test_the_walk_stays_in_the_channel_and_within_its_bounds(tmp_path, monkeypatch):
    outside = tmp_path / "outside"
    image(outside / "o.jpg")
    (outside / "o.xml").write_text(labelimg_xml("x", "o.jpg", (64, 48), [("cat", (1, 1, 9, 9))]))
    ch = tmp_path / "training"
    image(ch / "a.jpg")
    (ch / "linked").symlink_to(outside)  # a symlinked folder: never entered
    (ch / "a.xml").symlink_to(outside / "o.xml")  # a symlinked XML leading out: not read
    with pytest.raises(UserInputError, match="none with an <annotation> root"):
        read(ch)
    (ch / "a.xml").unlink()
    (ch / "a.xml").write_text(labelimg_xml("x", "a.jpg", (64, 48), [("cat", (1, 1, 9, 9))]))
    deep = ch / "d1" / "d2" / "d3"
    image(deep / "z.jpg")
    (deep / "z.xml").write_text(labelimg_xml("x", "z.jpg", (64, 48), [("cat", (1, 1, 9, 9))]))
    data, report = read(ch)
    assert sorted(boxes_by_file(data)) == ["a.jpg", "d1/d2/d3/z.jpg"]
    monkeypatch.setattr(scan, "MAX_DEPTH", 2)  # d1/d2/d3 is three levels down
    data, report = read(ch)
    assert sorted(boxes_by_file(data)) == ["a.jpg"]
    assert report.counts["folders_below_depth_limit_not_searched"] == 1
    assert report.examples["folders_below_depth_limit_not_searched"] == ["d1/d2/d3"]
    monkeypatch.setattr(scan, "MAX_FILES", 1)  # a.jpg and a.xml
    with pytest.raises(UserInputError, match=r"holds more than 1 files, .* annotations_file"):
        read(ch)


def test_detection_and_reading_share_one_walk(tmp_path, monkeypatch):
    ch = tmp_path / "training"
    image(ch / "images" / "a.jpg")
    (ch / "images" / "a.xml").write_text(labelimg_xml("images", "a.jpg", (64, 48), [("cat", (1, 1, 9, 9))]))
    walks = []
    walk = scan._walk
    monkeypatch.setattr(scan, "_walk", lambda root: walks.append(root) or walk(root))
    read(ch)
    assert walks == [ch]


def test_two_formats_in_one_channel_are_still_refused(tmp_path):
    ch = tmp_path / "training"
    image(ch / "images" / "a.jpg")
    (ch / "images" / "a.xml").write_text(labelimg_xml("images", "a.jpg", (64, 48), [("cat", (1, 1, 9, 9))]))
    (ch / "images" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (ch / "images" / "classes.txt").write_text("cat\n")
    with pytest.raises(UserInputError, match=r"more than one format: Pascal VOC \(images/a.xml\); "
                                             r"YOLO \(images/classes.txt, images/a.txt\)"):
        read(ch)
    data, report = read(ch, annotation_format="voc")
    assert boxes_by_file(data) == {"images/a.jpg": [("cat", [0.0, 0.0, 9.0, 9.0])]}


# --- item 8: coco128's data.yaml (val is the training folder) ---------------------------------

def test_a_data_yaml_whose_val_is_its_train_holds_out_val_fraction(tmp_path, caplog):
    ch = tmp_path / "training"
    names = ["person", "bicycle"]
    objects = {f"{k:012d}": [(names[k % 2], (4 * k, 2 * k, 4 * k + 20, 2 * k + 16))] for k in range(8)}
    for stem, boxes in objects.items():
        image(ch / "images" / "train2017" / f"{stem}.jpg")
        (ch / "labels" / "train2017").mkdir(parents=True, exist_ok=True)
        (ch / "labels" / "train2017" / f"{stem}.txt").write_text(
            "".join(yolo_row(names.index(n), b, (64, 48)) for n, b in boxes))
    (ch / "coco128.yaml").write_text(  # as Ultralytics ships it (names cut to two)
        "path: ../datasets/coco128 # dataset root dir\ntrain: images/train2017 # train images (relative to 'path') 128 images\n"
        "val: images/train2017 # val images (relative to 'path') 128 images\ntest: # test images (optional)\n\n"
        "# Classes\nnames:\n  0: person\n  1: bicycle\n")
    data, report = read(ch, val_fraction=0.25)
    assert report.split["how"] == "random, val_fraction=0.25, seed=42"
    assert (len(data.train), len(data.val)) == (6, 2)
    assert report.counts["split_yaml_val_is_train"] == 1 and "split_yaml_val_is_train=1" in report.summary()
    assert "val_fraction of the training images is held out at random" in caplog.text
    got = boxes_by_file(data)
    for stem, boxes in objects.items():
        np.testing.assert_allclose(got[f"images/train2017/{stem}.jpg"][0][1], boxes[0][1], atol=1e-3)


# --- item 16: Label Studio's JSON export; a 1e308 coordinate ----------------------------------

def label_studio_export(images: dict[str, tuple]) -> list[dict]:
    """Label Studio's "JSON" export of an image project with RectangleLabels: one task per
    image, boxes in percent of the image."""
    tasks = []
    for k, (name, ((w, h), label, (x, y, bw, bh))) in enumerate(images.items(), start=1):
        tasks.append({
            "id": k, "annotations": [{
                "id": k, "completed_by": 1, "result": [{
                    "original_width": w, "original_height": h, "image_rotation": 0,
                    "value": {"x": 100 * x / w, "y": 100 * y / h, "width": 100 * bw / w,
                              "height": 100 * bh / h, "rotation": 0, "rectanglelabels": [label]},
                    "id": f"r{k}", "from_name": "label", "to_name": "image", "type": "rectanglelabels",
                    "origin": "manual"}],
                "was_cancelled": False, "ground_truth": False, "created_at": "2024-05-01T10:00:00.000000Z",
                "updated_at": "2024-05-01T10:00:00.000000Z", "lead_time": 4.2, "prediction": {},
                "result_count": 0, "task": k, "project": 1, "updated_by": 1}],
            "file_upload": f"3f1a2b-{name}", "drafts": [], "predictions": [],
            "data": {"image": f"/data/upload/1/3f1a2b-{name}"}, "meta": {},
            "created_at": "2024-05-01T09:00:00.000000Z", "updated_at": "2024-05-01T10:00:00.000000Z",
            "inner_id": k, "total_annotations": 1, "cancelled_annotations": 0, "total_predictions": 0,
            "comment_count": 0, "unresolved_comment_count": 0, "last_comment_updated_at": None,
            "project": 1, "updated_by": 1, "comment_authors": []})
    return tasks


def test_a_label_studio_export_is_named_not_taken_for_createml(tmp_path):
    ch = tmp_path / "training"
    image(ch / "a.jpg")
    (ch / "project-1-at-2024-05-01.json").write_text(json.dumps(
        label_studio_export({"a.jpg": ((64, 48), "cat", (8, 6, 16, 12))}), indent=2))
    with pytest.raises(UserInputError, match=r"project-1-at-2024-05-01.json in the 'training' channel looks "
                                             r"like a Label Studio JSON export .* export the project from "
                                             r"Label Studio as COCO, Pascal VOC or YOLO instead"):
        read(ch)
    with pytest.raises(UserInputError, match=r"annotation_format is 'createml' but .* it holds .*"
                                             r"project-1-at-2024-05-01.json, a Label Studio JSON export"):
        read(ch, annotation_format="createml")
    # its JSON-MIN export: flat tasks, "image" and the boxes under the control's name
    (ch / "project-1-at-2024-05-01.json").unlink()
    (ch / "min.json").write_text(json.dumps([{
        "image": "/data/upload/1/3f1a2b-a.jpg", "id": 1, "label": [{
            "x": 12.5, "y": 12.5, "width": 25, "height": 25, "rotation": 0,
            "rectanglelabels": ["cat"], "original_width": 64, "original_height": 48}],
        "annotator": 1, "annotation_id": 1, "created_at": "2024-05-01T10:00:00.000000Z",
        "updated_at": "2024-05-01T10:00:00.000000Z", "lead_time": 3.1}]))
    with pytest.raises(UserInputError, match=r"min.json in the 'training' channel looks like a Label Studio"):
        read(ch)


def test_a_1e308_coordinate_is_dropped_without_numpy_warnings(tmp_path):
    ch = tmp_path / "training"
    image(ch / "a.jpg", (100, 80))
    (ch / "_annotations.createml.json").write_text(json.dumps([{"image": "a.jpg", "annotations": [
        {"label": "cat", "coordinates": {"x": 1.5e308, "y": 1e308, "width": 1e308, "height": 1e308}},
        {"label": "cat", "coordinates": {"x": 50, "y": 40, "width": 20, "height": 10}}]}]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's overflow RuntimeWarning would fail here
        data, report = read(ch)
    assert boxes_by_file(data) == {"a.jpg": [("cat", [40.0, 35.0, 60.0, 45.0])]}
    assert report.counts["box_dropped_outside_image"] == 1


# --- item 13: the worker pool is chosen from measurements --------------------------------------

def pids(items: list, delay: float) -> tuple[list, Report]:
    """A reader's chunk function: each item read (a pause of `delay`) as the pid that read it."""
    import time

    time.sleep(delay * len(items))
    return [(item, os.getpid()) for item in items], Report()


def test_the_pool_is_chosen_from_the_measured_rate(tmp_path, monkeypatch):
    items = list(range(3000))
    found, _ = common.map_chunks(pids, items, 0.0)  # quick items: all read here, no worker
    assert [i for i, _ in found] == items and {p for _, p in found} == {os.getpid()}
    cpus = min(len(os.sched_getaffinity(0)), 16)
    # the rule, from its constants: workers only when starting them and sharing beats here
    for seconds in (0.1, 1.0, 4.0, 30.0):
        pooled = common.WORKER_START_S + common.POOL_MARGIN * seconds / cpus
        assert common.pool_workers(seconds, cpus) == (cpus if cpus > 1 and pooled < seconds else 1)
    assert common.pool_workers(1000.0, 1) == 1
    # the CPUs free: ours less the load average's other runners (this process is one)
    assert [common.free_cpus(16, load) for load in (0.2, 1.0, 4.4, 4.6, 16.0, 40.0)] == [16, 16, 13, 12, 1, 1]
    assert [common.free_cpus(2, load) for load in (1.0, 1.6, 11.0)] == [2, 1, 1]
    assert 1 <= common.idle_cpus(cpus) <= cpus
    if cpus < 2:
        pytest.skip("worker processes need two CPUs")
    # slow items (2 ms each, 1.2 s in all here) against workers assumed to start in 0.1 s, on
    # CPUs taken as free: a shared machine's load would otherwise decide
    monkeypatch.setattr(common, "WORKER_START_S", 0.1)
    monkeypatch.setattr(common, "idle_cpus", lambda n: n)
    found, _ = common.map_chunks(pids, items[:600], 0.002)
    assert [i for i, _ in found] == items[:600]
    assert {p for _, p in found} - {os.getpid()}, "the rest went to worker processes"
    assert [p for _, p in found[:common.PROBE_CHUNK]] == [os.getpid()] * common.PROBE_CHUNK
