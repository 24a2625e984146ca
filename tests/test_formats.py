"""Annotation formats other than COCO: Pascal VOC, YOLO, CreateML and the built-in algorithm's.

The same generated shapes dataset is written in each format by hand (following each format's
documented shape) and must read back as the same records as its COCO; each format's edge cases
are written as small files; one short ./train per format checks the whole job.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST, REPO, run_train
from PIL import Image

from sm_effdet.data.formats import DataReport, common, read_dataset, yolo
from sm_effdet.demo import SHAPES, make_shapes_dataset
from sm_effdet.errors import UserInputError
from sm_effdet.hyperparameters import parse_hyperparameters

RACCOON = REPO.parent / "shared" / "data" / "raccoon"
if not RACCOON.is_dir():  # a worktree sits one level deeper than the main checkout
    RACCOON = REPO.parents[1] / "shared" / "data" / "raccoon"


def hp(**values):
    return parse_hyperparameters({k: str(v) for k, v in values.items()})


def read(channels: dict[str, Path], **values):
    report = DataReport()
    return read_dataset(channels, hp(**{"val_fraction": 0, **values}), report), report


def shapes(folder: Path, n: int = 6, seed: int = 0) -> dict:
    """A COCO shapes dataset with one negative (an image without boxes) added."""
    coco = make_shapes_dataset(folder, n_images=n, seed=seed)
    Image.new("RGB", (200, 150), "gray").save(folder / "images" / "empty.jpg")
    coco["images"].append({"id": 999, "file_name": "images/empty.jpg", "width": 200, "height": 150})
    (folder / "annotations.json").write_text(json.dumps(coco))
    return coco


def boxes_of(coco: dict) -> dict[int, list]:
    out = {i["id"]: [] for i in coco["images"]}
    for a in coco["annotations"]:
        out.get(a["image_id"], []).append(a)
    return out


# --- writers, each following its format's documented shape -----------------------------------

def write_voc(coco: dict, src: Path, dst: Path) -> None:
    """VOCdevkit layout; coordinates 1-based inclusive: xmin = x + 1, xmax = x + w."""
    names = {c["id"]: c["name"] for c in coco["categories"]}
    (dst / "Annotations").mkdir(parents=True)
    (dst / "JPEGImages").mkdir()
    for image in coco["images"]:
        stem = Path(image["file_name"]).stem
        shutil.copy(src / image["file_name"], dst / "JPEGImages" / f"{stem}.jpg")
        objects = "".join(
            f"<object><name>{names[a['category_id']]}</name><difficult>0</difficult><bndbox>"
            f"<xmin>{a['bbox'][0] + 1}</xmin><ymin>{a['bbox'][1] + 1}</ymin>"
            f"<xmax>{a['bbox'][0] + a['bbox'][2]}</xmax><ymax>{a['bbox'][1] + a['bbox'][3]}</ymax>"
            "</bndbox></object>"
            for a in boxes_of(coco)[image["id"]]
        )
        (dst / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.jpg</filename><size><width>{image['width']}</width>"
            f"<height>{image['height']}</height><depth>3</depth></size>{objects}</annotation>"
        )


def write_yolo(coco: dict, src: Path, dst: Path) -> None:
    """Ultralytics layout: images/{train,val}, labels/{train,val}, data.yaml with names as a map."""
    order = sorted(SHAPES)  # YOLO class k is the k-th category
    index = {cid: k for k, cid in enumerate(order)}
    yaml = "path: .\ntrain: images/train\nval: images/val\nnames:\n" + "".join(
        f"  {k}: {SHAPES[cid]}\n" for k, cid in enumerate(order)
    )
    (dst / "data.yaml").parent.mkdir(parents=True, exist_ok=True)
    (dst / "data.yaml").write_text(yaml)
    for n, image in enumerate(coco["images"]):
        part = "val" if n % 3 == 0 else "train"
        stem = Path(image["file_name"]).stem
        for sub in ("images", "labels"):
            (dst / sub / part).mkdir(parents=True, exist_ok=True)
        shutil.copy(src / image["file_name"], dst / "images" / part / f"{stem}.jpg")
        w, h = image["width"], image["height"]
        rows = [
            f"{index[a['category_id']]} {(a['bbox'][0] + a['bbox'][2] / 2) / w:.6f} "
            f"{(a['bbox'][1] + a['bbox'][3] / 2) / h:.6f} {a['bbox'][2] / w:.6f} {a['bbox'][3] / h:.6f}"
            for a in boxes_of(coco)[image["id"]]
        ]
        if rows:  # a negative has no label file at all
            (dst / "labels" / part / f"{stem}.txt").write_text("\n".join(rows) + "\n")


def write_createml(coco: dict, src: Path, dst: Path) -> None:
    names = {c["id"]: c["name"] for c in coco["categories"]}
    dst.mkdir(parents=True)
    items = []
    for image in coco["images"]:
        name = Path(image["file_name"]).name
        shutil.copy(src / image["file_name"], dst / name)
        items.append({"image": name, "annotations": [
            {"label": names[a["category_id"]], "coordinates": {
                "x": a["bbox"][0] + a["bbox"][2] / 2, "y": a["bbox"][1] + a["bbox"][3] / 2,
                "width": a["bbox"][2], "height": a["bbox"][3]}}
            for a in boxes_of(coco)[image["id"]]
        ]})
    (dst / "_annotations.createml.json").write_text(json.dumps(items))


def write_builtin(coco: dict, src: Path, images: Path, annotations: Path) -> None:
    images.mkdir(parents=True)
    annotations.mkdir(parents=True)
    categories = [{"class_id": c["id"], "name": c["name"]} for c in coco["categories"]]
    for image in coco["images"]:
        name = Path(image["file_name"]).name
        shutil.copy(src / image["file_name"], images / name)
        (annotations / f"{Path(name).stem}.json").write_text(json.dumps({
            "file": name,
            "image_size": [{"width": image["width"], "height": image["height"], "depth": 3}],
            "annotations": [
                {"class_id": a["category_id"], "left": a["bbox"][0], "top": a["bbox"][1],
                 "width": a["bbox"][2], "height": a["bbox"][3]}
                for a in boxes_of(coco)[image["id"]]
            ],
            "categories": categories,
        }))


def written(tmp_path: Path, fmt: str, coco: dict, src: Path) -> dict[str, Path]:
    """The dataset in `fmt`, as the channels a job would get."""
    root = tmp_path / fmt
    if fmt == "builtin":
        write_builtin(coco, src, root / "train", root / "train_annotation")
        return {"train": root / "train", "train_annotation": root / "train_annotation"}
    {"voc": write_voc, "yolo": write_yolo, "createml": write_createml}[fmt](coco, src, root / "training")
    return {"training": root / "training"}


def by_stem(dataset) -> dict[str, tuple]:
    names = {k + 1: c.name for k, c in enumerate(dataset.categories)}
    out = {}
    for r in dataset.train + dataset.val:
        order = np.lexsort(r.boxes.T[::-1])
        out[Path(r.file_name).stem] = (r.width, r.height, r.boxes[order], [names[int(x)] for x in r.labels[order]])
    return out


# --- the same data in every format --------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["voc", "yolo", "createml", "builtin"])
def test_each_format_reads_as_the_same_records_as_its_coco(tmp_path, fmt):
    src = tmp_path / "coco"
    coco = shapes(src)
    expected, _ = read({"training": src})
    channels = written(tmp_path, fmt, coco, src)
    got, report = read(channels)
    assert report.formats == {next(iter(c for c in channels if "train" in c and c != "train")): fmt}
    want, have = by_stem(expected), by_stem(got)
    assert sorted(have) == sorted(want)  # every image, the negative included
    assert have["empty"][2].shape == (0, 4)
    for stem, (w, h, boxes, labels) in want.items():
        assert have[stem][:2] == (w, h) and have[stem][3] == labels, stem
        np.testing.assert_allclose(have[stem][2], boxes, atol=0.5)
    assert sorted(c.name for c in got.categories) == sorted(SHAPES.values())
    if fmt == "builtin":  # the built-in format keeps its class ids, as COCO does
        assert [(c.id, c.name) for c in got.categories] == sorted(SHAPES.items())
    if fmt == "yolo":  # YOLO's ids are its class indices; its split is the yaml's train and val
        assert [(c.id, c.name) for c in got.categories] == list(enumerate(SHAPES[k] for k in sorted(SHAPES)))
        assert report.split["how"] == "data.yaml train and val" and len(got.val) == 3


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="worker processes need two CPUs")
def test_many_files_are_read_by_worker_processes_alike(tmp_path, monkeypatch):
    src = tmp_path / "coco"
    coco = shapes(src, n=7)
    for fmt in ("voc", "yolo"):
        channels = written(tmp_path, fmt, coco, src)
        (channels["training"] / "Annotations" / "broken.xml").write_text("<annotation>") if fmt == "voc" else None
        alone, alone_report = read(channels)
        monkeypatch.setattr(common, "WORKERS", 2)  # the process pool, whatever the measurement
        pooled, pooled_report = read(channels)
        monkeypatch.undo()
        assert by_stem(pooled).keys() == by_stem(alone).keys()
        for stem, (w, h, boxes, labels) in by_stem(alone).items():
            assert by_stem(pooled)[stem][3] == labels
            np.testing.assert_array_equal(by_stem(pooled)[stem][2], boxes)
        assert pooled_report.to_dict() == alone_report.to_dict()


# --- Pascal VOC ----------------------------------------------------------------------------------

def voc_xml(filename="a.jpg", size=(100, 80), objects="", extra=""):
    size_xml = "" if size is None else f"<size><width>{size[0]}</width><height>{size[1]}</height></size>"
    return f"<annotation>{extra}<filename>{filename}</filename>{size_xml}{objects}</annotation>"


def voc_object(name, box, difficult=0, part=""):
    x1, y1, x2, y2 = box
    return (f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{x1}</xmin>"
            f"<ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox>{part}</object>")


def test_voc_edge_cases(tmp_path):
    ch = tmp_path / "training"
    ch.mkdir()
    for stem in ("a", "b", "c", "d"):
        Image.new("RGB", (100, 80)).save(ch / f"{stem}.jpg")
    part = "<part><name>hand</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></part>"
    # 1-based inclusive: pixel 1..100 is the whole width [0, 100]; floats kept; <part> ignored
    (ch / "a.xml").write_text(voc_xml(objects=voc_object(" cat ", (1, 1, 100, 80), part=part)
                                      + voc_object("dog", (10.5, 20.5, 30.5, 40.5), difficult=1)))
    # no size: read from the header; a filename naming another file: the XML's stem wins
    (ch / "b.xml").write_text(voc_xml("IMG_0001.JPG", size=None, objects=voc_object("dog", (11, 21, 30, 40))))
    (ch / "c.xml").write_text(voc_xml("c.jpg", size=(0, 0)))  # zero size, no object: a negative
    (ch / "d.xml").write_text("<annotation><filename>d.jpg</oops>")  # does not parse
    (ch / "labelmap.txt").write_text("background\ndog\ncat\n")
    data, report = read({"training": ch})
    assert [(c.id, c.name) for c in data.categories] == [(1, "dog"), (2, "cat")]  # the list's order
    rec = {r.file_name: r for r in data.train}
    assert sorted(rec) == ["a.jpg", "b.jpg", "c.jpg"]
    np.testing.assert_allclose(rec["a.jpg"].boxes, [[0, 0, 100, 80], [9.5, 19.5, 30.5, 40.5]])
    assert rec["a.jpg"].labels.tolist() == [2, 1]  # the difficult box kept by default
    np.testing.assert_allclose(rec["b.jpg"].boxes, [[10, 20, 30, 40]])
    assert (rec["b.jpg"].width, rec["c.jpg"].height) == (100, 80)
    assert report.counts["image_size_read_from_file"] == 2
    assert report.counts["annotation_skipped_unreadable_xml"] == 1
    assert "d.xml" in report.examples["annotation_skipped_unreadable_xml"][0]
    assert report.counts["images_without_boxes_kept_as_negatives"] == 1
    dropped, report = read({"training": ch}, keep_difficult="false")
    assert report.counts["box_dropped_difficult"] == 1
    assert sum(len(r.labels) for r in dropped.train) == 2


def test_vocdevkit_image_sets_are_the_split(tmp_path):
    src = tmp_path / "coco"
    coco = shapes(src, n=5)
    write_voc(coco, src, tmp_path / "training")
    sets = tmp_path / "training" / "ImageSets" / "Main"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("shape_00000\nshape_00001\nshape_00002\nempty\n")
    (sets / "val.txt").write_text("shape_00003\n")
    (sets / "dog_train.txt").write_text("shape_00000  1\n")  # a per-class list: not a split
    data, report = read({"training": tmp_path / "training"}, val_fraction=0.5)
    assert report.split["how"].startswith("VOC ImageSets")
    assert sorted(Path(r.file_name).stem for r in data.val) == ["shape_00003"]
    assert len(data.train) == 4 and report.counts["split_images_in_neither_list"] == 1


def test_xml_entities_are_never_expanded_nor_fetched(tmp_path):
    ch = tmp_path / "training"
    ch.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    for stem in ("ok", "xxe", "bomb"):
        Image.new("RGB", (50, 50)).save(ch / f"{stem}.jpg")
    (ch / "ok.xml").write_text(voc_xml("ok.jpg", (50, 50), voc_object("cat", (1, 1, 20, 20))))
    (ch / "xxe.xml").write_text(
        f'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x SYSTEM "file://{secret}">]>'
        + voc_xml("xxe.jpg", (50, 50), voc_object("&x;", (1, 1, 20, 20)))
    )
    laughs = "".join(f'<!ENTITY l{k} "{("&l%d;" % (k - 1)) * 10 if k else "lol"}">' for k in range(10))
    (ch / "bomb.xml").write_text(
        f'<?xml version="1.0"?><!DOCTYPE a [{laughs}]>' + voc_xml("bomb.jpg", (50, 50), voc_object("&l9;", (1, 1, 20, 20)))
    )
    data, report = read({"training": ch})
    assert [c.name for c in data.categories] == ["cat"]
    assert report.counts["annotation_skipped_unreadable_xml"] == 2
    assert "TOPSECRET" not in json.dumps(report.to_dict())


def test_annotation_files_outside_the_channel_are_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    ch = tmp_path / "training"
    ch.mkdir()
    for stem in ("a", "b"):
        Image.new("RGB", (50, 50)).save(ch / f"{stem}.jpg")
    (ch / "a.xml").write_text(voc_xml("a.jpg", (50, 50), voc_object("cat", (1, 1, 20, 20))))
    (outside / "b.xml").write_text(voc_xml("b.jpg", (50, 50), voc_object("dog", (1, 1, 20, 20))))
    (ch / "b.xml").symlink_to(outside / "b.xml")
    data, report = read({"training": ch})  # a per-image file: counted and skipped
    assert [r.file_name for r in data.train] == ["a.jpg"]
    assert report.counts["annotation_skipped_outside_channel"] == 1
    # the annotation file itself (COCO JSON, data.yaml): one sentence naming it
    coco_ch = tmp_path / "coco"
    make_shapes_dataset(outside / "c", n_images=2)
    coco_ch.mkdir()
    (coco_ch / "images").symlink_to(outside / "c" / "images")
    (coco_ch / "annotations.json").symlink_to(outside / "c" / "annotations.json")
    with pytest.raises(UserInputError, match=r"COCO file .*annotations.json is a symlink to a file outside"):
        read({"training": coco_ch})
    (coco_ch / "annotations.json").unlink()
    shutil.copy(outside / "c" / "annotations.json", coco_ch / "annotations.json")
    (outside / "split.json").write_text('{"train": [1], "val": [2]}')
    (coco_ch / "split.json").symlink_to(outside / "split.json")
    with pytest.raises(UserInputError, match=r"split file .*split.json is a symlink to a file outside"):
        read({"training": coco_ch}, split_file="split.json")
    y = tmp_path / "yolo"
    (y / "images").mkdir(parents=True)
    (outside / "data.yaml").write_text("train: images\nnames: [cat]\n")
    (y / "data.yaml").symlink_to(outside / "data.yaml")
    with pytest.raises(UserInputError, match=r"data.yaml .*yolo/data.yaml is a symlink to a file outside"):
        read({"training": y})
    (y / "data.yaml").unlink()
    (y / "data.yaml").write_text("train: images\nnames: [cat]\n")
    (y / "labels").mkdir()
    for stem in ("in", "out"):
        Image.new("RGB", (50, 50)).save(y / "images" / f"{stem}.jpg")
    (y / "labels" / "in.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (outside / "out.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (y / "labels" / "out.txt").symlink_to(outside / "out.txt")  # a label file: its image skipped
    data, report = read({"training": y})
    assert [r.file_name for r in data.train] == ["images/in.jpg"]
    assert report.counts["annotation_skipped_outside_channel"] == 1


def test_the_raccoon_photographs_read_as_voc_every_one_used():
    if not RACCOON.is_dir():
        pytest.skip("the shared raccoon photographs are not on this machine")
    data, report = read({"training": RACCOON}, val_fraction=0.2)
    assert report.formats == {"training": "voc"}
    assert len(data.train) + len(data.val) == 200 == report.counts["images_used"]
    assert [c.name for c in data.categories] == ["raccoon"]
    assert report.counts["image_size_read_from_file"] == 0  # every XML has its size


# --- YOLO ----------------------------------------------------------------------------------------

def test_yolo_label_paths_follow_the_images_to_labels_rule():
    assert yolo.label_path("images/train/a.jpg") == "labels/train/a.txt"
    assert yolo.label_path("train/images/x/images/b.png") == "train/images/x/labels/b.txt"
    assert yolo.label_path("flat/c.jpeg") == "flat/c.txt"


def test_yolo_edge_cases(tmp_path):
    ch = tmp_path / "training"
    for part in ("train", "valid"):
        (ch / part / "images").mkdir(parents=True)
        (ch / part / "labels").mkdir(parents=True)
    for name in ("a", "b", "c", "d"):
        Image.new("RGB", (200, 100)).save(ch / "train" / "images" / f"{name}.jpg")
    Image.new("RGB", (200, 100)).save(ch / "valid" / "images" / "v.jpg")
    # Roboflow's data.yaml: paths from a folder above, names as a list, nc
    (ch / "data.yaml").write_text("train: ../train/images\nval: ../valid/images\nnc: 2\nnames: ['cat', 'dog']\n")
    (ch / "train" / "labels" / "a.txt").write_text(
        "0 0.5 0.5 0.5 0.5\n"
        "0 0.5 0.5 0.5 0.5\n"              # a repeated row: dropped
        "1 0.1 0.1 0.3 0.1 0.3 0.3 0.1 0.3\n"  # a polygon: its bounds
        "5 0.5 0.5 0.1 0.1\n"              # class >= nc: that row only
        "0 0.95 0.5 0.2 0.2\n"             # past the right edge: clipped
        "1 1.5 1.5 0.1 0.1\n"              # wholly outside: dropped
        "1 nan 0.5 0.1 0.1\n"              # malformed
    )
    (ch / "train" / "labels" / "b.txt").write_text("")  # empty: a negative; c has no file
    (ch / "valid" / "labels" / "v.txt").write_text("1 0.5 0.5 1 1\n")
    data, report = read({"training": ch})
    rec = {Path(r.file_name).stem: r for r in data.train}
    assert sorted(rec) == ["a", "b", "c", "d"] and [Path(r.file_name).stem for r in data.val] == ["v"]
    np.testing.assert_allclose(rec["a"].boxes, [[50, 25, 150, 75], [20, 10, 60, 30], [170, 40, 200, 60]], atol=1e-3)
    assert rec["a"].labels.tolist() == [1, 2, 1]
    assert len(rec["b"].labels) == len(rec["c"].labels) == 0
    c = report.counts
    assert (c["box_dropped_repeated_row"], c["box_dropped_unknown_category"], c["box_clipped_to_image"],
            c["box_dropped_outside_image"], c["box_dropped_malformed"]) == (1, 1, 1, 1, 1)
    assert c["images_without_label_file"] == 2  # c and d
    assert [(x.id, x.name) for x in data.categories] == [(0, "cat"), (1, "dog")]


def test_yolo_text_lists_darknet_names_and_yaml_errors(tmp_path):
    ch = tmp_path / "training"
    (ch / "images").mkdir(parents=True)
    (ch / "labels").mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (100, 100)).save(ch / "images" / f"{name}.jpg")
        (ch / "labels" / f"{name}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (ch / "train.txt").write_text("./images/a.jpg\n")
    (ch / "val.txt").write_text("images/b.jpg\n/elsewhere/c.jpg\n")
    (ch / "data.yaml").write_text("path: /content/datasets/x\ntrain: train.txt\nval: val.txt\nnames: {0: cat}\n")
    data, report = read({"training": ch})
    assert [r.file_name for r in data.train] == ["images/a.jpg"] and [r.file_name for r in data.val] == ["images/b.jpg"]
    assert report.counts["image_skipped_unsafe_file_name"] == 1 and report.counts["yaml_path_ignored"] == 1
    (ch / "data.yaml").write_text("train: images\nval: ../../elsewhere/images\nnames: [cat]\n")
    with pytest.raises(UserInputError, match=r"data.yaml points to ../../elsewhere/images, which is not in the channel \(tried"):
        read({"training": ch})
    (ch / "data.yaml").unlink()
    (ch / "obj.names").write_text("cat\n")  # Darknet: no yaml, a class list and labels/
    data, report = read({"training": ch})
    assert report.formats == {"training": "yolo"} and len(data.train) == 2


# --- detection, CreateML, Roboflow's COCO, classes across channels ------------------------------

def test_detection_refuses_two_formats_and_honours_annotation_format(tmp_path):
    src = tmp_path / "coco"
    coco = shapes(src, n=3)
    write_createml(coco, src, tmp_path / "training")
    shutil.copy(src / "annotations.json", tmp_path / "training" / "annotations.json")
    with pytest.raises(UserInputError, match=r"more than one format: COCO \(annotations.json\); CreateML \(_annotations.createml.json\)"):
        read({"training": tmp_path / "training"})
    data, report = read({"training": tmp_path / "training"}, annotation_format="createml")
    assert report.formats == {"training": "createml"} and len(data.train) == 4
    with pytest.raises(UserInputError, match="annotation_format is 'voc' but the 'training' channel .* does not hold Pascal VOC XMLs"):
        read({"training": tmp_path / "training"}, annotation_format="voc")
    with pytest.raises(UserInputError, match="annotation_format is 'groundtruth' but .* does not hold a Ground Truth manifest"):
        read({"training": tmp_path / "training"}, annotation_format="groundtruth")


def test_createml_roboflow_split_folders(tmp_path):
    src = tmp_path / "coco"
    coco = shapes(src, n=4)
    ch = tmp_path / "training"
    write_createml({**coco, "images": coco["images"][:3]}, src, ch / "train")
    write_createml({**coco, "images": coco["images"][3:]}, src, ch / "valid")
    data, report = read({"training": ch})
    assert report.split["how"] == "train/ and valid/ folders"
    assert (len(data.train), len(data.val)) == (3, 2)


def test_roboflow_coco_placeholder_category_is_dropped(tmp_path):
    coco = make_shapes_dataset(tmp_path, n_images=3)
    coco["categories"] = [{"id": 0, "name": "shapes", "supercategory": "none"}] + [
        {**c, "supercategory": "shapes"} for c in coco["categories"]]
    (tmp_path / "annotations.json").write_text(json.dumps(coco))
    data, report = read({"training": tmp_path})
    assert [c.name for c in data.categories] == ["rectangle", "ellipse", "triangle"]
    assert report.counts["category_dropped_unused_placeholder"] == 1


def test_classes_are_matched_by_name_across_channels_in_different_formats(tmp_path):
    src = tmp_path / "coco"
    coco = shapes(src, n=4)
    channels = written(tmp_path, "voc", coco, src)  # training as VOC: ids 1..3 by sorted name
    val_src = tmp_path / "val"
    val = make_shapes_dataset(val_src, n_images=3, seed=5)
    val["categories"].append({"id": 40, "name": "star"})  # a class training lacks
    val["annotations"].append({"id": 500, "image_id": 1, "category_id": 40, "bbox": [1, 1, 20, 20]})
    (val_src / "annotations.json").write_text(json.dumps(val))
    data, report = read({**channels, "validation": val_src})
    assert [(c.id, c.name) for c in data.categories] == [(1, "ellipse"), (2, "rectangle"), (3, "triangle")]
    names = {1: "ellipse", 2: "rectangle", 3: "triangle"}
    coco_names = dict(SHAPES)
    for r in data.val:
        stem_boxes = [a for a in val["annotations"] if a["image_id"] == r.image_id and a["category_id"] != 40]
        assert sorted(names[int(x)] for x in r.labels) == sorted(coco_names[a["category_id"]] for a in stem_boxes)
    assert report.counts["category_not_in_training"] == 1 and report.counts["box_dropped_unknown_category"] == 1
    assert report.channels["validation"]["category_not_in_training"] == 1


# --- the real ./train: every format in a job, three jobs ---------------------------------------

def _job_tree(tmp_path: Path, fmt: str, val_fmt: str | None) -> Path:
    base = tmp_path / "opt_ml"
    data = base / "input" / "data"
    data.mkdir(parents=True)
    coco = shapes(tmp_path / "coco", n=6)
    channels = written(tmp_path / "train", fmt, coco, tmp_path / "coco")
    if val_fmt:
        val = make_shapes_dataset(tmp_path / "val", n_images=3, seed=4)
        for name, path in written(tmp_path / "val", val_fmt, val, tmp_path / "val").items():
            channels[{"training": "validation", "train": "validation"}.get(name, "validation_annotation")] = path
    for name, path in channels.items():
        shutil.move(str(path), data / name)
    config = base / "input" / "config"
    config.mkdir(parents=True)
    (config / "hyperparameters.json").write_text(json.dumps(FAST))
    (config / "inputdataconfig.json").write_text(
        json.dumps({c: {"TrainingInputMode": "File"} for c in channels}))
    return base


@pytest.mark.parametrize("fmt, val_fmt", [("yolo", "voc"), ("builtin", "builtin"), ("createml", None)])
def test_a_job_trains_an_epoch_on_each_format(tmp_path, fmt, val_fmt):
    base = _job_tree(tmp_path, fmt, val_fmt)
    result = run_train(base)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    card = json.loads((base / "model" / "model.json").read_text())
    classes = [(c["id"], c["name"]) for c in card["classes"]]
    if fmt == "yolo":  # model.json maps labels back to YOLO's class indices
        assert classes == [(0, "rectangle"), (1, "ellipse"), (2, "triangle")]
    elif fmt == "builtin":  # and to the built-in format's class ids
        assert classes == sorted(SHAPES.items())
    else:
        assert classes == [(1, "ellipse"), (2, "rectangle"), (3, "triangle")]
    report = json.loads((base / "output" / "data" / "data_report.json").read_text())
    assert report["formats"][next(iter(report["formats"]))] == fmt
    if val_fmt:  # validation in its own format, its classes matched by name
        assert report["split"]["how"] == "validation channel" and report["split"]["val"] == 3
        assert list(report["formats"].values())[1] == val_fmt
    else:
        assert report["counts"]["images_used"] == 7
