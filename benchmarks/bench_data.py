"""`make bench` sections on reading data: 1 (start-up at COCO scale), 2 (the input pipeline),
10 (start-up for YOLO and Pascal VOC) and 11 (start-up from a Ground Truth manifest), with the
children they time in processes of their own (bench.py --child)."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

from bench_common import images_per_second, jpeg, jpeg_set, run_child

# ---------------------------------------------------------------- 1. start-up at COCO scale


def coco_scale_tree(base: Path, n_images: int, n_boxes: int) -> Path:
    """A training channel with COCO's size; every image a hard link to a 640x480 JPEG."""
    channel = base / "input" / "data" / "training"
    (channel / "images").mkdir(parents=True)
    links_per_file = 60_000  # ext4 allows 65,000 links to one file
    rng = random.Random(0)
    category_ids = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
    images, annotations = [], []
    for i in range(n_images):
        name = f"images/{i:012d}.jpg"
        if i % links_per_file == 0:
            source = channel / f"source{i // links_per_file}.jpg"
            jpeg(source, 640, 480)
        os.link(source, channel / name)
        images.append({"id": i + 1, "file_name": name, "width": 640, "height": 480})
    for j in range(n_boxes):
        w, h = rng.uniform(8, 300), rng.uniform(8, 300)
        x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
        annotations.append({
            "id": j + 1, "image_id": rng.randint(1, n_images), "category_id": rng.choice(category_ids),
            "bbox": [round(x, 2), round(y, 2), round(w, 2), round(h, 2)], "area": w * h, "iscrowd": 0,
            "segmentation": [],
        })
    categories = [{"id": c, "name": f"class_{c}", "supercategory": "thing"} for c in category_ids]
    for source in channel.glob("source*.jpg"):
        source.unlink()
    (channel / "annotations.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return channel


def child_json_load(channel: str) -> dict:
    started, cpu = time.perf_counter(), time.process_time()
    with open(Path(channel) / "annotations.json", "rb") as f:
        json.load(f)
    return {"seconds": time.perf_counter() - started, "cpu": time.process_time() - cpu}


def child_job_dataset(channel: str) -> dict:
    # Imports are timed apart: a fixed cost, the same for ten images or a million.
    started = time.perf_counter()
    from sm_effdet.data.dataset import DetectionDataset
    from sm_effdet.data.formats import DataReport, coco
    from sm_effdet.data.formats.split import split_records
    from sm_effdet.data.transforms import train_transform

    imports = time.perf_counter() - started
    started = time.perf_counter()
    channel_path = Path(channel)
    report = DataReport()
    data = coco.load_coco(channel_path, channel_path / "annotations.json", report)
    train, val = split_records(data.images, split_file=None, val_fraction=0.2, seed=0, report=report)
    DetectionDataset(train, train_transform(512, augment=True), 512)
    return {"seconds": time.perf_counter() - started, "imports": imports, "images": len(train) + len(val)}


def child_icevision_parser(channel: str) -> dict:
    from sm_effdet.model.efficientdet import ensure_icevision_font

    ensure_icevision_font()
    from icevision import parsers
    from icevision.data import RandomSplitter

    started = time.perf_counter()
    channel_path = Path(channel)
    parser = parsers.COCOBBoxParser(annotations_filepath=channel_path / "annotations.json", img_dir=channel_path)
    parser.parse(data_splitter=RandomSplitter([0.8, 0.2]), autofix=True)
    return {"seconds": time.perf_counter() - started}


def startup(work: Path, n_images: int, n_boxes: int, icevision_images: int) -> tuple[Path, list[str]]:
    lines = []
    started = time.perf_counter()
    channel = coco_scale_tree(work / "coco", n_images, n_boxes)
    lines.append(f"  generated {n_images} images / {n_boxes} boxes in {time.perf_counter() - started:.0f} s")
    baseline = run_child("json_load", str(channel))
    ours = run_child("job_dataset", str(channel))
    lines.append(f"  json.load                        {baseline['seconds']:7.2f} s  peak {baseline['peak_mb']:6.0f} MB")
    lines.append(
        f"  job: COCO -> training dataset    {ours['seconds']:7.2f} s  peak {ours['peak_mb']:6.0f} MB"
        f"  = {ours['seconds'] / baseline['seconds']:.2f}x json.load (goal <= 3x);"
        f" imports before it {ours['imports']:.1f} s"
    )
    if icevision_images:
        subset = coco_scale_tree(work / "coco-subset", icevision_images, int(icevision_images * n_boxes / n_images))
        small_json = run_child("json_load", str(subset))
        small_ours = run_child("job_dataset", str(subset))
        seed = run_child("icevision_parser", str(subset))
        lines.append(
            f"  subset of {icevision_images} images: json.load {small_json['seconds']:.3f} s, job "
            f"{small_ours['seconds']:.3f} s ({small_ours['seconds'] / small_json['seconds']:.1f}x), "
            f"Icevision COCOBBoxParser {seed['seconds']:.2f} s ({seed['seconds'] / small_json['seconds']:.1f}x), "
            f"peak {seed['peak_mb']:.0f} MB"
        )
    return channel, lines


# ---------------------------------------------------------------- 2. input pipeline


def input_pipeline(work: Path, n: int, batch: int) -> list[str]:
    from sm_effdet.data.dataset import DetectionDataset, make_loader
    from sm_effdet.data.formats import DataReport, coco
    from sm_effdet.data.transforms import train_transform
    from sm_effdet.model.efficientdet import ensure_icevision_font

    ensure_icevision_font()
    from icevision import parsers, tfms
    from icevision.data import Dataset, SingleSplitSplitter
    from icevision.models.ross import efficientdet

    lines = []
    for width, height in ((640, 480), (1920, 1080)):
        folder = jpeg_set(work / f"jpeg-{width}", width, height, n)
        records = coco.load_coco(folder, folder / "annotations.json", DataReport()).images
        ours_loader = make_loader(
            DetectionDataset(records, train_transform(512, augment=True), 512), batch, 0,
            shuffle=False, pin_memory=False,
        )
        plain_loader = make_loader(
            DetectionDataset(records, train_transform(512, augment=False), 512), batch, 0,
            shuffle=False, pin_memory=False,
        )

        parser = parsers.COCOBBoxParser(annotations_filepath=folder / "annotations.json", img_dir=folder)
        (ice_records,) = parser.parse(data_splitter=SingleSplitSplitter(), autofix=False)
        seed_ds = Dataset(ice_records, tfms.A.Adapter([*tfms.A.resize_and_pad(512), tfms.A.Normalize()]))
        seed_loader = efficientdet.train_dl(seed_ds, batch_size=batch, num_workers=0, shuffle=False)

        n_images = len(records)
        list(ours_loader), list(seed_loader)  # warm the page cache and both code paths once
        # Interleaved rounds, best of each: this machine's other load hits both alike.
        seed_rate = ours_rate = plain_rate = 0.0
        for _ in range(3):
            seed_rate = max(seed_rate, images_per_second(lambda: list(seed_loader), n_images))
            ours_rate = max(ours_rate, images_per_second(lambda: list(ours_loader), n_images))
            plain_rate = max(plain_rate, images_per_second(lambda: list(plain_loader), n_images))
        lines.append(
            f"  {width}x{height}: seed {seed_rate:6.1f} img/s; job {ours_rate:6.1f} img/s per process"
            f" = {ours_rate / seed_rate:.2f}x (goal >= 2x); job without augmentation (as the seed)"
            f" {plain_rate:6.1f} img/s = {plain_rate / seed_rate:.2f}x"
        )
    return lines


# ---------------------------------------------------------------- 10. start-up for other formats


def other_formats_tree(base: Path, n_images: int, n_boxes: int) -> dict[str, Path]:
    """The same images and boxes as a COCO JSON, YOLO labels and VOC XMLs, one channel each;
    every image a hard link to one of a few 640x480 JPEGs."""
    rng = random.Random(0)
    channels = {f: base / f for f in ("coco", "yolo", "voc")}
    for channel in channels.values():
        (channel / "images").mkdir(parents=True)
    (channels["yolo"] / "labels").mkdir()
    (channels["voc"] / "annotations").mkdir()
    per_image: list[list] = [[] for _ in range(n_images)]
    for _ in range(n_boxes):
        w, h = rng.uniform(8, 300), rng.uniform(8, 300)
        x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
        per_image[rng.randrange(n_images)].append((rng.randrange(80), round(x, 2), round(y, 2), round(w, 2), round(h, 2)))
    images, annotations = [], []
    for i, boxes in enumerate(per_image):
        if i % 20_000 == 0:  # ext4 allows 65,000 links to one file; three channels link to it
            source = base / f"source{i}.jpg"
            jpeg(source, 640, 480, seed=i)
        stem = f"{i:012d}"
        for channel in channels.values():
            os.link(source, channel / "images" / f"{stem}.jpg")
        images.append({"id": i, "file_name": f"images/{stem}.jpg", "width": 640, "height": 480})
        annotations += [{"id": len(annotations), "image_id": i, "category_id": c, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": 0} for c, x, y, w, h in boxes]
        (channels["yolo"] / "labels" / f"{stem}.txt").write_text("".join(
            f"{c} {(x + w / 2) / 640:.6f} {(y + h / 2) / 480:.6f} {w / 640:.6f} {h / 480:.6f}\n"
            for c, x, y, w, h in boxes))
        (channels["voc"] / "annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.jpg</filename><size><width>640</width><height>480</height>"
            "<depth>3</depth></size>" + "".join(
                f"<object><name>class_{c}</name><difficult>0</difficult><bndbox><xmin>{x + 1}</xmin>"
                f"<ymin>{y + 1}</ymin><xmax>{x + w}</xmax><ymax>{y + h}</ymax></bndbox></object>"
                for c, x, y, w, h in boxes) + "</annotation>")
    for source in base.glob("source*.jpg"):
        source.unlink()
    (channels["coco"] / "annotations.json").write_text(json.dumps({
        "images": images, "annotations": annotations,
        "categories": [{"id": c, "name": f"class_{c}"} for c in range(80)]}))
    (channels["yolo"] / "data.yaml").write_text(
        "train: images\nnames: [" + ", ".join(f"class_{c}" for c in range(80)) + "]\n")
    return channels


def child_format_read(channel: str, fmt: str, workers: str) -> dict:
    from sm_effdet.data.formats import DataReport, common, voc, yolo
    from sm_effdet.hyperparameters import parse_hyperparameters

    # no: all in this process (its CPU time is all of it); yes: always a worker per CPU;
    # auto: what the job does (map_chunks measures and chooses).
    common.WORKERS = {"no": 1, "yes": max(2, len(os.sched_getaffinity(0))), "auto": None}[workers]
    reader = {"voc": voc, "yolo": yolo}[fmt]
    started, cpu = time.perf_counter(), time.process_time()
    data = reader.read(Path(channel), parse_hyperparameters({}), DataReport())
    return {"seconds": time.perf_counter() - started, "cpu": time.process_time() - cpu,
            "images": len(data.images),
            "boxes": sum(len(r.labels) for r in data.images)}


def child_worker_start() -> dict:
    """How long one spawned worker takes to start and read nothing (the readers' imports)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from sm_effdet.data.formats import voc

    started = time.perf_counter()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(voc.parse_xmls, [], ".").result()
    return {"seconds": time.perf_counter() - started}


def child_image_headers(channel: str) -> dict:
    from sm_effdet.data.formats.common import image_size

    paths = sorted((Path(channel) / "images").iterdir())
    started, cpu = time.perf_counter(), time.process_time()
    for path in paths:
        image_size(path)
    return {"seconds": time.perf_counter() - started, "cpu": time.process_time() - cpu}


def other_formats(work: Path, n_images: int, n_boxes: int) -> list[str]:
    from sm_effdet.data.formats.common import WORKER_START_S

    start = run_child("worker_start")
    lines = [f"  a worker process starts in {start['seconds']:.2f} s (the readers assume "
             f"WORKER_START_S = {WORKER_START_S} s)"]
    # A small set first: there a pool costs more than it saves (3,000 files read 3-4x slower
    # pooled on 2 CPUs under the former fixed 2,000-file threshold).
    small = other_formats_tree(work / "formats-3000", 3_000, max(1, 3_000 * n_boxes // n_images))
    for fmt in ("yolo", "voc"):
        runs = {w: run_child("format_read", str(small[fmt]), fmt, w) for w in ("no", "yes", "auto")}
        lines.append(f"  {fmt:4s} 3,000 files: {runs['no']['seconds']:.2f} s in one process, "
                     f"{runs['yes']['seconds']:.2f} s with a worker per CPU, "
                     f"{runs['auto']['seconds']:.2f} s as the job chooses")
    started = time.perf_counter()
    channels = other_formats_tree(work / "formats", n_images, n_boxes)
    lines.append(f"  generated {n_images} images / {n_boxes} boxes in three formats in "
                 f"{time.perf_counter() - started:.0f} s")
    baseline = run_child("json_load", str(channels["coco"]))
    # CPU seconds beside wall seconds: on a shared machine the wall clock measures the neighbours.
    lines.append(f"  json.load of the COCO JSON       {baseline['seconds']:7.2f} s wall {baseline['cpu']:7.2f} s CPU")
    for fmt, label in (("yolo", "YOLO labels -> records"), ("voc", "VOC XMLs -> records")):
        alone = run_child("format_read", str(channels[fmt]), fmt, "no")
        pooled = run_child("format_read", str(channels[fmt]), fmt, "yes")
        chosen = run_child("format_read", str(channels[fmt]), fmt, "auto")
        lines.append(
            f"  {label:32s} {alone['seconds']:7.2f} s wall {alone['cpu']:7.2f} s CPU in one process"
            f" = {alone['cpu'] / baseline['cpu']:.1f}x json.load's CPU; {pooled['seconds']:.2f} s wall"
            f" with a worker per CPU, {chosen['seconds']:.2f} s as the job chooses ({alone['images']}"
            f" images, {alone['boxes']} boxes, peak {alone['peak_mb']:.0f} MB)"
        )
    headers = run_child("image_headers", str(channels["yolo"]))
    lines.append(f"  of YOLO's, the image headers     {headers['seconds']:7.2f} s wall {headers['cpu']:7.2f} s CPU"
                 " (Pillow, no pixels; page cache warm)")
    return lines


# ---------------------------------------------------------------- 11. a Ground Truth manifest


def manifest_from_coco(channel: Path) -> Path:
    """The output manifest a bounding-box labelling job would have written for the channel's
    COCO JSON: one line per image, with image_size, so reading it opens no image. The images
    sit in the channel's images/ folder, below the manifest's common S3 prefix's parent, as when
    a channel holds a dataset folder: each is found by its file name."""
    from collections import defaultdict

    coco = json.loads((channel / "annotations.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    boxes = defaultdict(list)
    for a in coco["annotations"]:
        boxes[a["image_id"]].append(a)
    path = channel / "output.manifest"
    with open(path, "w") as f:
        for image in coco["images"]:
            own = boxes[image["id"]]
            f.write(json.dumps({
                "source-ref": f"s3://bench-bucket/coco/{image['file_name']}",
                "bench-job": {
                    "image_size": [{"width": image["width"], "height": image["height"], "depth": 3}],
                    "annotations": [
                        {"class_id": a["category_id"], "left": a["bbox"][0], "top": a["bbox"][1],
                         "width": a["bbox"][2], "height": a["bbox"][3]} for a in own
                    ],
                },
                "bench-job-metadata": {
                    "objects": [{"confidence": 0.9} for _ in own],
                    "class-map": {str(c): names[c] for c in {a["category_id"] for a in own}},
                    "type": "groundtruth/object-detection", "human-annotated": "yes",
                    "creation-date": "2026-01-01T00:00:00.000000", "job-name": "labeling-job/bench-job",
                },
            }) + "\n")
    return path


def child_groundtruth_read(channel: str) -> dict:
    started = time.perf_counter()
    from sm_effdet.data.formats import DataReport, groundtruth
    from sm_effdet.hyperparameters import parse_hyperparameters

    imports = time.perf_counter() - started
    started = time.perf_counter()
    report = DataReport()
    data = groundtruth.read(Path(channel), parse_hyperparameters({}), report)
    return {"seconds": time.perf_counter() - started, "imports": imports, "images": len(data.images),
            "opened": report.counts["image_size_read_from_file"]}


def groundtruth_startup(work: Path, channel: Path | None, n_images: int, n_boxes: int) -> list[str]:
    lines = []
    if channel is None:
        channel = coco_scale_tree(work / "groundtruth", n_images, n_boxes)
    started = time.perf_counter()
    manifest = manifest_from_coco(channel)
    count = manifest.read_bytes().count(b"\n")
    lines.append(f"  wrote a {count}-line manifest "
                 f"({manifest.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - started:.0f} s")
    baseline = run_child("json_load", str(channel))
    ours = run_child("groundtruth_read", str(channel))
    lines.append(f"  json.load of the COCO JSON            {baseline['seconds']:7.2f} s  peak {baseline['peak_mb']:6.0f} MB")
    lines.append(
        f"  job: manifest -> {ours['images']} image records {ours['seconds']:7.2f} s  peak {ours['peak_mb']:6.0f} MB"
        f"  = {ours['seconds'] / baseline['seconds']:.2f}x json.load; images opened {ours['opened']};"
        f" imports before it {ours['imports']:.1f} s"
    )
    return lines

