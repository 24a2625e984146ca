"""EXIF orientation (issue 24, item 2): phone photographs stored sideways with an Orientation
tag, labelled on the upright picture as labelling tools show it.

The rule: an image is used as it is shown. Sizes read from headers (YOLO, CreateML, VOC
without <size>, COCO without width/height) are the upright ones; training, validation, the
report's drawings, the server and the standalone inference.py decode the upright picture, and
boxes are in its pixels. An annotation that declares the stored size instead (LabelImg shows
pictures unturned) is used on the stored pixels, its boxes as drawn, and counted.

The photographs are built here: a red object on a plain background, the stored pixels turned
from the upright ones by the EXIF specification's own definition of each orientation, saved
as JPEG with Pillow's Exif. Expected boxes are the object's upright position, chosen here.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST
from PIL import Image
from test_serve import ATTRS, Server

from sm_effdet.data.dataset import DetectionDataset, collate, load_image, read_image
from sm_effdet.data.formats import DataReport, common, read_dataset
from sm_effdet.data.transforms import eval_transform
from sm_effdet.hyperparameters import parse_hyperparameters
from sm_effdet.model import preprocessing

ORIENTATION = 0x0112
WIDTH, HEIGHT = 200, 400  # the upright picture, as shown: stored 400x200 under 6 and 8
BOX = (30, 250, 110, 330)  # the object, upright: x1, y1, x2, y2 (pixel edges)
RED, GROUND = (230, 20, 20), (60, 110, 60)


def upright_picture() -> np.ndarray:
    picture = np.empty((HEIGHT, WIDTH, 3), np.uint8)
    picture[:] = GROUND
    x1, y1, x2, y2 = BOX
    picture[y1:y2, x1:x2] = RED
    return picture


def stored_pixels(upright: np.ndarray, orientation: int) -> np.ndarray:
    """What a camera writes: the display turns these by the tag (EXIF 2.32: 3 = rotate 180,
    6 = rotate 90 clockwise, 8 = rotate 90 counter-clockwise to show), so stored is the inverse."""
    quarters_ccw = {1: 0, 3: 2, 6: 1, 8: -1}[orientation]
    return np.ascontiguousarray(np.rot90(upright, quarters_ccw))


def stored_box(orientation: int) -> tuple[int, int, int, int]:
    """BOX in the stored pixels' coordinates, by hand for each turn."""
    x1, y1, x2, y2 = BOX
    return {
        1: BOX,
        3: (WIDTH - x2, HEIGHT - y2, WIDTH - x1, HEIGHT - y1),
        6: (y1, WIDTH - x2, y2, WIDTH - x1),  # stored (x', y') = (y, W - 1 - x)
        8: (HEIGHT - y2, x1, HEIGHT - y1, x2),  # stored (x', y') = (H - 1 - y, x)
    }[orientation]


def red_bounds(pixels: np.ndarray) -> tuple[int, int, int, int]:
    p = pixels.astype(int)
    mask = (p[..., 0] > 150) & (p[..., 1] < 90) & (p[..., 2] < 90)
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def photograph(path: Path, orientation: int) -> Path:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    Image.fromarray(stored_pixels(upright_picture(), orientation)).save(path, "JPEG", quality=95, exif=exif)
    return path


def test_the_photographs_are_what_the_specification_says(tmp_path):
    """The test's own stored pixels and box, checked against Pillow's exif_transpose."""
    from PIL import ImageOps

    for o in (3, 6, 8):
        stored = stored_pixels(upright_picture(), o)
        assert red_bounds(stored) == stored_box(o)
        with Image.open(photograph(tmp_path / f"{o}.jpg", o)) as img:
            assert img.size == stored.shape[1::-1] and Image.Image.getexif(img)[ORIENTATION] == o
            assert red_bounds(np.asarray(ImageOps.exif_transpose(img))) == pytest.approx(BOX, abs=1)


# --- every format, written on the upright picture ---------------------------------------------

PHOTOS = {o: f"phone_{o}.jpg" for o in (3, 6, 8)}


def _voc(name: str, box, size: tuple[int, int] | None) -> str:
    x1, y1, x2, y2 = box
    size_xml = f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>" if size else ""
    return (f"<annotation><folder>JPEGImages</folder><filename>{name}</filename>{size_xml}<object>"
            f"<name>thing</name><difficult>0</difficult><bndbox><xmin>{x1 + 1}</xmin><ymin>{y1 + 1}</ymin>"
            f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object></annotation>")


def write_export(folder: Path, fmt: str) -> None:
    """The three photographs and their annotations, written as each tool writes them."""
    x1, y1, x2, y2 = BOX
    if fmt == "yolo":  # Ultralytics: images/, labels/, data.yaml; boxes normalised by the upright size
        (folder / "data.yaml").parent.mkdir(parents=True)
        (folder / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames:\n  0: thing\n")
        for o, name in PHOTOS.items():
            part = "val" if o == 8 else "train"
            for sub in ("images", "labels"):
                (folder / sub / part).mkdir(parents=True, exist_ok=True)
            photograph(folder / "images" / part / name, o)
            row = (f"0 {(x1 + x2) / 2 / WIDTH:.6f} {(y1 + y2) / 2 / HEIGHT:.6f} "
                   f"{(x2 - x1) / WIDTH:.6f} {(y2 - y1) / HEIGHT:.6f}\n")
            (folder / "labels" / part / f"{Path(name).stem}.txt").write_text(row)
    elif fmt == "createml":  # Roboflow's _annotations.createml.json: centre-anchored pixels
        folder.mkdir(parents=True)
        items = []
        for o, name in PHOTOS.items():
            photograph(folder / name, o)
            items.append({"image": name, "annotations": [{"label": "thing", "coordinates": {
                "x": (x1 + x2) / 2, "y": (y1 + y2) / 2, "width": x2 - x1, "height": y2 - y1}}]})
        (folder / "_annotations.createml.json").write_text(json.dumps(items))
    elif fmt in ("voc", "voc-sized"):  # VOCdevkit; CVAT and Label Studio write the upright size
        (folder / "Annotations").mkdir(parents=True)
        (folder / "JPEGImages").mkdir()
        for o, name in PHOTOS.items():
            photograph(folder / "JPEGImages" / name, o)
            size = (WIDTH, HEIGHT) if fmt == "voc-sized" else None
            (folder / "Annotations" / f"{Path(name).stem}.xml").write_text(_voc(name, BOX, size))
    elif fmt in ("coco", "coco-unsized"):
        (folder / "images").mkdir(parents=True)
        images, annotations = [], []
        for k, (o, name) in enumerate(PHOTOS.items(), 1):
            photograph(folder / "images" / name, o)
            images.append({"id": k, "file_name": name,
                           **({"width": WIDTH, "height": HEIGHT} if fmt == "coco" else {})})
            annotations.append({"id": k, "image_id": k, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
        (folder / "annotations.json").write_text(json.dumps(
            {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}))
    else:
        raise AssertionError(fmt)


def read(folder: Path):
    report = DataReport()
    hp = parse_hyperparameters({"val_fraction": "0"})
    dataset = read_dataset({"training": folder}, hp, report)
    return {Path(r.file_name).name: r for r in dataset.train + dataset.val}, report


@pytest.mark.parametrize("fmt", ["yolo", "createml", "voc", "voc-sized", "coco", "coco-unsized"])
def test_each_format_reads_upright_boxes_and_the_loader_puts_the_object_in_them(tmp_path, fmt):
    write_export(tmp_path / fmt, fmt)
    records, report = read(tmp_path / fmt)
    assert sorted(records) == sorted(PHOTOS.values()), report.to_dict()
    assert report.summary().endswith("all usable"), report.summary()
    for o, name in PHOTOS.items():
        record = records[name]
        assert (record.width, record.height) == (WIDTH, HEIGHT), (fmt, o)
        assert record.boxes[0].tolist() == pytest.approx(BOX, abs=0.01), (fmt, o)
        for target in (None, 128):  # full decode, and a 1/2 JPEG draft
            pixels, scale, _ = load_image(record, target)
            assert pixels.shape[1::-1] == (round(WIDTH * scale), round(HEIGHT * scale))
            assert red_bounds(pixels) == pytest.approx([v * scale for v in BOX], abs=1.5), (fmt, o, target)


def test_labelimg_voc_with_the_stored_size_keeps_its_boxes_on_the_stored_pixels(tmp_path):
    """LabelImg (Qt, no EXIF turn) shows the stored picture and writes its size and boxes: the
    declared size says which picture the boxes were drawn on, so they stay on the object."""
    folder = tmp_path / "labelimg"
    (folder / "Annotations").mkdir(parents=True)
    (folder / "JPEGImages").mkdir()
    for o, name in PHOTOS.items():
        photograph(folder / "JPEGImages" / name, o)
        stored = (HEIGHT, WIDTH) if o in (6, 8) else (WIDTH, HEIGHT)
        (folder / "Annotations" / f"{Path(name).stem}.xml").write_text(_voc(name, stored_box(o), stored))
    records, report = read(folder)
    dataset = DetectionDataset([records[n] for n in PHOTOS.values()], eval_transform(256, (0, 0, 0)), 256)
    for o, name in PHOTOS.items():
        record = records[name]
        assert record.boxes[0].tolist() == pytest.approx(stored_box(o))
        decoded = read_image(record)
        if o in (6, 8):
            assert red_bounds(decoded.pixels) == pytest.approx(stored_box(o), abs=1.5), o
            assert decoded.ignored == o
        else:  # 3 keeps the size: nothing says which picture was labelled; upright, as most
            # tools show it, so this LabelImg box misses the object (the documented limit).
            assert red_bounds(decoded.pixels) == pytest.approx(BOX, abs=1.5)
            assert decoded.ignored == 0
    batch = collate([dataset[k] for k in range(len(dataset))])
    six, eight = records[PHOTOS[6]].file_name, records[PHOTOS[8]].file_name
    assert sorted(batch["exif_ignored"]) == [(six, 6), (eight, 8)]

    # The training module counts them once each in the data report, however many epochs.
    from sm_effdet.model.efficientdet import build_model
    from sm_effdet.training.lightning_module import EfficientDetModule

    hp = parse_hyperparameters(FAST)
    module = EfficientDetModule(build_model(hp.backbone, 1, hp.img_size, pretrained=False, pretrained_dir=None),
                                hp, None, report)
    module.count_skipped(batch)
    module.count_skipped(batch)
    assert report.counts["image_exif_orientation_not_applied"] == 2
    assert report.examples["image_exif_orientation_not_applied"] == [f"{six}: orientation 6",
                                                                    f"{eight}: orientation 8"]


def test_a_size_matching_neither_picture_names_both(tmp_path):
    from sm_effdet.data.dataset import ImageLoadError
    from sm_effdet.data.formats import ImageRecord

    path = photograph(tmp_path / "p.jpg", 6)
    record = ImageRecord(1, "p.jpg", path, 300, 300, np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
    with pytest.raises(ImageLoadError, match=r"^p.jpg is 200x400 as shown \(its EXIF orientation 6 turns "
                                             r"the stored 400x200\) but the annotations say 300x300$"):
        read_image(record)


def test_the_report_drawing_puts_the_ground_truth_around_the_object(tmp_path):
    from sm_effdet.evaluation.best_epoch import BestOutcome
    from sm_effdet.evaluation.plots import MOSAIC_TILE, draw_mosaic

    write_export(tmp_path / "coco", "coco")
    records, _ = read(tmp_path / "coco")
    record = records[PHOTOS[6]]
    outcome = BestOutcome(epoch=1, results=np.zeros((0, 7)), evaluation=None, analysis=None, threshold=0.5,
                          f1=0.0, confusion=None, per_class=[])
    canvas = draw_mosaic([record], outcome, ["thing"])
    scale = MOSAIC_TILE / HEIGHT
    x1, y1, x2, y2 = (v * scale for v in BOX)
    tile = canvas[: round(HEIGHT * scale), : round(WIDTH * scale)]
    assert red_bounds(tile) == pytest.approx((x1, y1, x2, y2), abs=2.5)
    p = tile.astype(int)
    green = (p[..., 1] >= 180) & (p[..., 0] < 80) & (p[..., 2] < 80)  # the ground truth's outline
    ys, xs = np.nonzero(green)
    assert xs.min() == pytest.approx(x1, abs=2) and xs.max() == pytest.approx(x2, abs=2)
    assert ys.min() == pytest.approx(y1, abs=2)


# --- one rule for sizes and decoding, and no pixel decoded for a size -------------------------

def _png_with_exif_after_pixels(orientation: int) -> bytes:
    """A PNG whose eXIf chunk follows IDAT (the PNG extension allows it; Pillow writes it first)."""
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    out = io.BytesIO()
    Image.new("RGB", (40, 20), RED).save(out, "PNG")
    data = out.getvalue()
    payload = exif.tobytes()
    chunk = (len(payload).to_bytes(4, "big") + b"eXIf" + payload
             + zlib.crc32(b"eXIf" + payload).to_bytes(4, "big"))
    end = data.rindex(b"IEND") - 4
    return data[:end] + chunk + data[end:]


def _saved(tmp_path: Path, fmt: str, orientation: int) -> Path:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    path = tmp_path / f"o{orientation}.{fmt.lower()}"
    Image.new("RGB", (40, 20), RED).save(path, fmt, exif=exif)
    return path


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_header_sizes_and_decoding_follow_one_rule(tmp_path, fmt):
    for orientation in (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 300):  # 0, 9 and 300 are not orientations
        path = _saved(tmp_path, fmt, orientation)
        array, size = preprocessing.decode_image(path)
        expected = (20, 40) if orientation in (5, 6, 7, 8) else (40, 20)
        assert common.image_size(path) == size == array.shape[1::-1] == expected, (fmt, orientation)
    late = tmp_path / "late.png"
    late.write_bytes(_png_with_exif_after_pixels(6))
    # Past the pixel data is not the header: neither the readers nor the decoder turn it.
    assert common.image_size(late) == preprocessing.decode_image(late)[1] == (40, 20)


def test_every_orientation_turns_the_pixels_as_pillow_does():
    from PIL import ImageOps

    rng = np.random.default_rng(0)
    stored = rng.integers(0, 256, (3, 5, 3), dtype=np.uint8)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        out = io.BytesIO()
        Image.fromarray(stored).save(out, "PNG", exif=exif)
        with Image.open(out) as img:
            pillow = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
        array, size = preprocessing.decode_image(out.getvalue())
        assert np.array_equal(array, pillow) and size == pillow.shape[1::-1], orientation


def test_a_size_is_read_from_the_header_without_decoding_a_pixel(tmp_path):
    """Images whose pixel data is garbage: decoding fails, the header still gives the size."""
    png = tmp_path / "o6.png"
    png.write_bytes(_saved(tmp_path, "PNG", 6).read_bytes())
    data = bytearray(png.read_bytes())
    start = data.index(b"IDAT") + 4
    data[start:start + 8] = b"\xff" * 8  # no longer zlib data
    png.write_bytes(bytes(data))
    jpeg = photograph(tmp_path / "phone.jpg", 6)
    data = jpeg.read_bytes()
    jpeg.write_bytes(data[: data.index(b"\xff\xda") + 20])  # cut just after the scan header
    for path in (png, jpeg):
        with pytest.raises(preprocessing.ImageDecodeError):
            preprocessing.decode_image(path)
    assert common.image_size(png) == (20, 40)
    assert common.image_size(jpeg) == (WIDTH, HEIGHT)


# --- serving and the standalone inference.py ----------------------------------------------------

@pytest.fixture(scope="module")
def exif_server(trained_model, tmp_path_factory):
    srv = Server(trained_model, tmp_path_factory.mktemp("log") / "serve.log")
    yield srv
    srv.stop()


def _detections(response) -> dict:
    assert response.status_code == 200, response.text
    (image,) = response.json()["predictions"]
    return image


def test_the_server_and_inference_py_answer_in_the_upright_pictures_pixels(exif_server, trained_model, tmp_path):
    """The rotated JPEG, and the same pixels turned here and sent as a PNG without EXIF, get the
    same answer: the server turned the JPEG upright, and its boxes are in the upright pixels."""
    jpeg = photograph(tmp_path / "phone.jpg", 6)
    with Image.open(jpeg) as img:  # decoded as stored, then turned by the specification
        upright = np.ascontiguousarray(np.rot90(np.asarray(img.convert("RGB")), -1))
    png = io.BytesIO()
    Image.fromarray(upright).save(png, "PNG")
    options = {ATTRS: "score_threshold=0,max_detections=20"}
    rotated = _detections(exif_server.post(jpeg.read_bytes(), **options))
    plain = _detections(exif_server.post(png.getvalue(), "image/png", **options))
    assert (rotated["width"], rotated["height"]) == (plain["width"], plain["height"]) == (WIDTH, HEIGHT)
    assert len(rotated["detections"]) == len(plain["detections"]) == 20
    for a, b in zip(rotated["detections"], plain["detections"]):
        assert a["label"] == b["label"] and a["score"] == pytest.approx(b["score"], abs=1e-5)
        assert a["box"] == pytest.approx(b["box"], abs=1e-3)
        x1, y1, x2, y2 = a["box"]
        assert 0 <= x1 <= x2 <= WIDTH and 0 <= y1 <= y2 <= HEIGHT

    model_dir = trained_model / "model"
    script = subprocess.run(
        [sys.executable, "-I", str(model_dir / "inference.py"), str(model_dir), str(jpeg), "--threshold", "0"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert script.returncode == 0, script.stderr[-2000:]
    by_script = json.loads(script.stdout.splitlines()[-1])["detections"]
    for a, b in zip(rotated["detections"], by_script[:20]):
        assert a["label"] == b["label"] and a["score"] == pytest.approx(b["score"], abs=1e-5)
        assert a["box"] == pytest.approx(b["box"], abs=1e-3)
