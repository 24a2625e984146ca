"""Images as they come: modes, EXIF orientation, corrupt files and oversized ones."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image

from sm_effdet.data.dataset import DetectionDataset, ImageLoadError, collate, load_image
from sm_effdet.data.formats import MAX_IMAGE_PIXELS, ImageRecord
from sm_effdet.data.transforms import eval_transform, train_transform


def record(path: Path, width: int, height: int, boxes=((10, 10, 50, 40),)) -> ImageRecord:
    return ImageRecord(
        image_id=1, file_name=path.name, path=path, width=width, height=height,
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        labels=np.ones(len(boxes), np.int64),
    )


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "CMYK", "1", "I;16"])
def test_every_mode_becomes_rgb_uint8(tmp_path, mode):
    source = Image.linear_gradient("L").resize((64, 48))
    if mode == "I;16":
        image = Image.fromarray((np.asarray(source, np.uint16) * 257).astype(np.uint16))
        assert image.mode.startswith("I;16")
    else:
        image = source.convert(mode)
    path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    image.save(path)
    array, _, _ = load_image(record(path, 64, 48))
    assert array.shape == (48, 64, 3) and array.dtype == np.uint8
    if mode == "I;16":  # scaled back to 8 bits, not saturated at 255
        assert np.abs(array[:, :, 0].astype(int) - np.asarray(source, int)).max() <= 1


def test_exif_rotated_jpeg_is_turned_upright_when_annotated_upright(tmp_path):
    upright = np.zeros((100, 200, 3), np.uint8)  # 200 wide, 100 high, as the annotator saw it
    upright[10:40, 150:190] = 255
    stored = np.ascontiguousarray(np.rot90(upright, k=1))  # stored 100 wide, 200 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    array, _, _ = load_image(record(path, 200, 100))
    assert array.shape == (100, 200, 3)
    assert array[25, 170].mean() > 200 and array[80, 20].mean() < 50  # the box is where it was
    # Annotated on the stored pixels (a tool that ignores EXIF): the stored pixels are used.
    assert load_image(record(path, 100, 200))[0].shape == (200, 100, 3)


def test_corrupt_truncated_and_mismatched_images_raise(tmp_path):
    good = io.BytesIO()
    Image.new("RGB", (64, 48), "red").save(good, format="JPEG")
    (tmp_path / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (tmp_path / "garbage.jpg").write_bytes(b"\x00" * 100)
    (tmp_path / "ok.jpg").write_bytes(good.getvalue())
    for name in ("truncated.jpg", "garbage.jpg"):
        with pytest.raises(ImageLoadError, match=f"cannot read {name}"):
            load_image(record(tmp_path / name, 64, 48))
    with pytest.raises(ImageLoadError, match="ok.jpg is 64x48 but the annotations say 65x48"):
        load_image(record(tmp_path / "ok.jpg", 65, 48))


def test_decompression_bomb_is_refused_from_its_header(tmp_path):
    side = int((MAX_IMAGE_PIXELS * 1.1) ** 0.5)
    path = tmp_path / "bomb.png"
    Image.new("1", (side, side)).save(path)  # a few kB on disk, far over the pixel limit
    with pytest.raises(ImageLoadError, match="bomb.png has more pixels than the limit of"):
        load_image(record(path, 100, 100))


def test_skipped_images_travel_with_the_batch(tmp_path):
    Image.new("RGB", (64, 48), "blue").save(tmp_path / "a.jpg")
    (tmp_path / "b.jpg").write_bytes(b"broken")
    records = [record(tmp_path / "a.jpg", 64, 48), record(tmp_path / "b.jpg", 64, 48, boxes=())]
    for transform in (train_transform(256, augment=True), eval_transform(256)):
        batch = collate([DetectionDataset(records, transform)[i] for i in range(2)])
        assert batch["images"].shape == (1, 3, 256, 256) and batch["images"].dtype.is_floating_point is False
        assert batch["skipped"][0][0] == "b.jpg"
    only_bad = collate([DetectionDataset(records[1:], eval_transform(256))[0]])
    assert only_bad["images"] is None and len(only_bad["skipped"]) == 1


def test_the_recipe_scale_range_and_share_reach_the_zoom():
    """A box in the middle of a square image: zoomed by exactly the range's one value on every
    image when the share is 1, never when it is 0 (flips and colour leave the width alone)."""
    image = np.full((256, 256, 3), 128, np.uint8)
    box = [96.0, 96.0, 160.0, 160.0]

    def widths(scale, share):
        transform = train_transform(256, True, scale=scale, scale_p=share)
        out = [transform(image=image, bboxes=[box], labels=[1])["bboxes"] for _ in range(12)]
        return {round(b[0][2] - b[0][0]) for b in out}

    assert widths((0.5, 0.5), 1.0) == {32}
    assert widths((1.5, 1.5), 1.0) == {96}
    assert widths((0.5, 0.5), 0.0) == {64}


def test_image_without_boxes_gets_an_ignored_placeholder(tmp_path):
    Image.new("RGB", (64, 48)).save(tmp_path / "empty.jpg")
    batch = collate([DetectionDataset([record(tmp_path / "empty.jpg", 64, 48, boxes=())], eval_transform(256))[0]])
    assert batch["targets"]["cls"][0].tolist() == [-1.0]
    assert batch["targets"]["img_scale"].tolist() == [64 / 256]


def test_large_jpeg_is_decoded_at_reduced_scale_with_boxes_scaled(tmp_path):
    big = np.zeros((1080, 1920, 3), np.uint8)
    big[200:600, 800:1600] = 255
    path = tmp_path / "big.jpg"
    Image.fromarray(big).save(path, quality=95)
    rec = record(path, 1920, 1080, boxes=((800, 200, 1600, 600),))
    array, scale, _ = load_image(rec, target=256)
    assert max(array.shape[:2]) >= 256 and array.shape[1] == 240 * 2  # 1/4 of 1920
    assert scale == array.shape[1] / 1920
    assert array[int(400 * scale), int(1200 * scale)].mean() > 200
    full, full_scale, _ = load_image(rec)
    assert full.shape == (1080, 1920, 3) and full_scale == 1.0
    # The dataset's output is the same, up to resampling, with and without the reduced decode.
    reduced = DetectionDataset([rec], eval_transform(256), img_size=256)[0]
    plain = DetectionDataset([rec], eval_transform(256))[0]
    assert torch.allclose(reduced["bbox"], plain["bbox"], atol=1.0)
    assert reduced["img_scale"] == plain["img_scale"] == 1920 / 256
    diff = (reduced["image"].float() - plain["image"].float()).abs().mean()
    assert diff < 8


# Odd and prime sides from 2x to 8x img_size=256: every libjpeg reduction (1/2, 1/4, 1/8) and
# every rounding of a side that is not a multiple of the reduction.
ODD_SIDES = (511, 513, 626, 767, 899, 1021, 1031, 1279, 1537, 2039, 2053, 2311)


def test_odd_sized_jpegs_decode_at_reduced_scale_to_their_exact_size(tmp_path):
    checked = set()
    for width in ODD_SIDES:
        for height in ODD_SIDES[::3]:
            path = tmp_path / f"{width}x{height}.jpg"
            # A bright block whose position shows that the boxes scale with the pixels.
            pixels = np.zeros((height, width, 3), np.uint8)
            pixels[height // 4 : height // 2, width // 4 : width // 2] = 255
            Image.fromarray(pixels).save(path, quality=90)
            box = (width / 4, height / 4, width / 2, height / 2)
            array, scale, truncated = load_image(record(path, width, height, (box,)), target=256)
            reduce = round(1 / scale)
            checked.add(reduce)
            assert not truncated
            assert array.shape == (-(-height // reduce), -(-width // reduce), 3), (width, height)
            middle = int((box[1] + box[3]) / 2 * scale), int((box[0] + box[2]) / 2 * scale)
            assert array[middle].mean() > 200, (width, height)
    assert checked == {1, 2, 4, 8}


def test_the_raccoon_photographs_load_at_every_scale():
    import glob

    photos = sorted(glob.glob(str(REPO.parent / "shared" / "data" / "raccoon" / "images" / "*.jpg")))
    if not photos:
        pytest.skip("the shared raccoon photographs are not on this machine")
    for path in photos:
        with Image.open(path) as img:
            width, height = img.size
        for target in (None, 256):
            array, scale, _ = load_image(record(Path(path), width, height), target=target)
            assert array.shape[2] == 3 and abs(array.shape[1] / scale - width) < 1 / scale


def _photo_jpeg(width: int = 640, height: int = 480) -> bytes:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).resize((width, height), Image.BICUBIC).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_jpeg_short_of_its_last_bytes_is_used_and_flagged(tmp_path):
    from PIL import ImageFile

    data = _photo_jpeg()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) - 200])  # an interrupted download: the end is missing
    with Image.open(path) as img, pytest.raises(OSError, match="truncated"):
        img.load()  # Pillow alone refuses it
    for target in (None, 256):
        array, scale, truncated = load_image(record(path, 640, 480), target=target)
        assert truncated and array.shape[1] == 640 * scale
        assert array[: array.shape[0] // 2].std() > 10  # real pixels, not the grey fill
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # no global side effect
    full = tmp_path / "full.jpg"
    full.write_bytes(data)
    assert load_image(record(full, 640, 480))[2] is False


def test_jpeg_with_most_of_it_missing_is_still_skipped(tmp_path):
    data = _photo_jpeg()
    (tmp_path / "half.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "header.jpg").write_bytes(data[:300])
    with pytest.raises(ImageLoadError, match=r"half.jpg is cut short: \d+ of its 480 rows are missing"):
        load_image(record(tmp_path / "half.jpg", 640, 480))
    with pytest.raises(ImageLoadError, match="cannot read header.jpg"):
        load_image(record(tmp_path / "header.jpg", 640, 480))


def test_truncated_images_travel_with_the_batch(tmp_path):
    data = _photo_jpeg(320, 240)
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) - 100])
    (tmp_path / "whole.jpg").write_bytes(data)
    records = [record(tmp_path / "cut.jpg", 320, 240), record(tmp_path / "whole.jpg", 320, 240)]
    dataset = DetectionDataset(records, eval_transform(256))
    batch = collate([dataset[0], dataset[1]])
    assert batch["images"].shape[0] == 2 and batch["truncated"] == ["cut.jpg"]
