"""`make bench`: the job's speed, each figure against its baseline measured in the same run.

Not a pass/fail test: it prints figures.

1. start-up at COCO scale: time to a ready training dataset from a COCO JSON of 118,000 images
   and 860,000 boxes, against json.load of the same file (and Icevision's COCOBBoxParser, the
   seed's parser, on a subset, since it opens every image); peak memory of each.
2. input pipeline: images per second per loader process at 512 px, the job's training
   pipeline against the seed's (Icevision's resize_and_pad + Normalize adapter and train_dl),
   on 640x480 and 1920x1080 JPEGs.
3. end to end: training images per second of the job's loop (loader + model) against the
   model alone on synthetic tensors already on the device.
4. time from process start to the first training step of ./train, for the demo dataset and
   the COCO-scale JSON.
5. serving on CPU: ./serve's images/s and p50/p99 latency at concurrency 1 and 8 (real HTTP
   requests, 640x480 JPEGs), with the PyTorch and the ONNX Runtime backends, against a plain
   loop calling the PyTorch model directly (inference.py's decode + predict) in the same run;
   the server's RSS after 10 requests and after 1,000.
6. prediction on CPU, tf_lite0 at 512 px, batch 1 and 8: PyTorch against ONNX Runtime running
   the exported model.onnx, both inside effdet's DetBenchPredict.
7. anchor labelling: a training step with effdet's per-image labelling inside the step against
   one with the labels made beforehand (as effdet's own trainer does in its loader workers).

8. COCO evaluation: the job's evaluator (faster-coco-eval) against pycocotools on the same
   generated detections (5,000 images, 100 detections each, 80 classes), and the largest
   difference of the 12 numbers.
9. TensorBoard: ./train's epoch time on the demo dataset with `tensorboard` on against off,
   runs alternated in the same bench run (median over the epochs after the first).

10. start-up for other formats: 118,000 YOLO label files (data.yaml, one .txt per image) and
   118,000 Pascal VOC XMLs for the same images and boxes, each read into the job's records,
   against json.load of the equivalent COCO JSON; YOLO reads every image's header (its labels
   hold no size), timed apart. Each is read in one process, with a worker process per CPU, and
   as the job chooses (measuring the rate, common.map_chunks), at 3,000 files and at full
   size; and a worker process's start is timed.
11. start-up from a Ground Truth output manifest of the same 118,000 images (one JSON line each,
   with image_size, so no image is opened): the job's manifest reader to image records, against
   json.load of the equivalent COCO JSON.
12. serving memory under large images: peak RSS of ./serve while 20 concurrent requests each
   hold a 39.7-megapixel PNG (154 kB compressed), with the decode budget
   (SERVE_MAX_DECODE_PIXELS, 80,000,000: two such images at once) and with it lifted (every
   request decodes at once, as before the budget).

`--sections 5` runs only the serving part (any list, e.g. `--sections 8,9`);
`--serve-requests`/`--rss-requests`, `--eval-images` and `--tb-epochs`/`--tb-repeats` shorten them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


# ---------------------------------------------------------------- data


def jpeg(path: Path, width: int, height: int, seed: int = 0) -> None:
    from sm_effdet.demo import draw_shapes_image

    image, _ = draw_shapes_image(random.Random(seed), width, height)
    image.save(path, quality=90)


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


def jpeg_set(folder: Path, width: int, height: int, n: int) -> Path:
    """n JPEGs of one size and a COCO JSON for them."""
    from sm_effdet.demo import make_shapes_dataset

    make_shapes_dataset(folder, n_images=n, size=(width, height))
    # make_shapes_dataset turns every third image to portrait; keep one size throughout.
    coco = json.loads((folder / "annotations.json").read_text())
    for entry in coco["images"]:
        if (entry["width"], entry["height"]) != (width, height):
            (folder / entry["file_name"]).unlink()
    coco["images"] = [e for e in coco["images"] if (e["width"], e["height"]) == (width, height)]
    kept = {e["id"] for e in coco["images"]}
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in kept]
    (folder / "annotations.json").write_text(json.dumps(coco))
    return folder


# ---------------------------------------------------------------- children (one process each)


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


def child_onnx_cpu(img_size: str, batches: str, rounds: str) -> dict:
    """Predict bench (network + effdet's post-processing), PyTorch against ONNX Runtime."""
    import torch
    from effdet import create_model

    from sm_effdet.model.export import OnnxEfficientDet, export_onnx

    size = int(img_size)
    # Random weights: speed does not depend on them; both benches hold the same ones.
    torch_bench = create_model("tf_efficientdet_lite0", bench_task="predict", num_classes=3,
                               image_size=(size, size), pretrained=False, pretrained_backbone=False).eval()
    onnx_bench = create_model("tf_efficientdet_lite0", bench_task="predict", num_classes=3,
                              image_size=(size, size), pretrained=False, pretrained_backbone=False).eval()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        record = export_onnx(torch_bench.model, size, Path(tmp) / "model.onnx")
        export_seconds = time.perf_counter() - started
        onnx_bench.model = OnnxEfficientDet(Path(tmp) / "model.onnx", device="cpu")
    result = {"export_seconds": export_seconds, "check": record["max_relative_difference"],
              "threads": torch.get_num_threads()}
    for batch in map(int, batches.split(",")):
        x = torch.randn(batch, 3, size, size)
        rates = {"torch": 0.0, "onnx": 0.0}
        with torch.inference_mode():
            for bench in (torch_bench, onnx_bench):
                bench(x)  # warm-up: kernels chosen, memory arenas grown
            # Interleaved rounds, best of each: other load on the machine hits both alike.
            for _ in range(int(rounds)):
                for name, bench in (("torch", torch_bench), ("onnx", onnx_bench)):
                    rates[name] = max(rates[name], images_per_second(lambda b=bench, x=x: b(x), batch))
        result[f"batch_{batch}"] = rates
    return result


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


CHILDREN = {
    f.__name__[len("child_"):]: f
    for f in (child_json_load, child_job_dataset, child_icevision_parser, child_onnx_cpu,
              child_format_read, child_image_headers, child_worker_start)
}


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


CHILDREN["groundtruth_read"] = child_groundtruth_read


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


def run_child(name: str, *args: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", name, *args], capture_output=True, text=True, check=False
    )
    if out.returncode:
        raise RuntimeError(f"{name} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- figures


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


def images_per_second(iterate, n_images: int) -> float:
    started = time.perf_counter()
    iterate()
    return n_images / (time.perf_counter() - started)


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


def end_to_end(work: Path, img_size: int, batch: int, steps: int) -> list[str]:
    import torch

    from sm_effdet.data.dataset import DetectionDataset, make_loader
    from sm_effdet.data.formats import DataReport, coco
    from sm_effdet.data.transforms import train_transform
    from sm_effdet.model.efficientdet import build_model
    from sm_effdet.model.preprocessing import backbone_normalization, normalize
    from sm_effdet.training.job import resolve_num_workers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    folder = jpeg_set(work / "e2e", 640, 480, batch * (steps + 2) * 2)  # a third is dropped
    records = coco.load_coco(folder, folder / "annotations.json", DataReport()).images
    loader = make_loader(
        DetectionDataset(records, train_transform(img_size, augment=True), img_size),
        batch, resolve_num_workers("auto"), shuffle=True, pin_memory=device.type == "cuda",
    )
    bench = build_model("tf_lite0", 3, img_size, pretrained=False, pretrained_dir=None).to(device).train()
    optimizer = torch.optim.AdamW(bench.parameters(), lr=1e-4)
    norm = backbone_normalization("tf_efficientdet_lite0")

    def to_device(batch_: dict) -> tuple:
        targets = {k: [t.to(device) for t in v] if isinstance(v, list) else v.to(device)
                   for k, v in batch_["targets"].items()}
        return batch_["images"].to(device, non_blocking=True), targets

    def step(images, targets) -> None:
        loss = bench(normalize(images, norm["mean"], norm["std"]), targets)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    batches = iter(loader)
    step(*to_device(next(batches)))  # warm-up: workers started, kernels chosen
    synthetic = to_device(next(batches))
    sync()
    started = time.perf_counter()
    for _ in range(steps):
        step(*synthetic)
    sync()
    model_only = steps * batch / (time.perf_counter() - started)
    started, seen = time.perf_counter(), 0
    for _ in range(steps):
        images, targets = to_device(next(batches))
        step(images, targets)
        seen += len(images)
    sync()
    job = seen / (time.perf_counter() - started)
    return [
        f"  {device.type}, tf_lite0 at {img_size} px, batch {batch}: model only {model_only:.1f} img/s, "
        f"job loop {job:.1f} img/s = {job / model_only:.2f} (goal on a GPU >= 0.9)"
    ]


def anchor_labelling(img_size: int, batch: int, steps: int) -> list[str]:
    """Step time with effdet's per-image anchor labelling inside the step (the training bench,
    on the training device) against labels made beforehand (what effdet's own trainer does in
    the loader workers: a bench without a labeler takes them in the targets)."""
    import torch
    from effdet import DetBenchTrain

    from sm_effdet.model.efficientdet import build_model

    torch.manual_seed(0)
    bench = build_model("tf_lite0", 3, img_size, pretrained=False, pretrained_dir=None).train()
    prelabelled = DetBenchTrain(bench.model, create_labeler=False).train()
    labeler = bench.anchor_labeler
    images = torch.randn(batch, 3, img_size, img_size)
    boxes = [torch.tensor([[20.0, 30.0, 120.0, 140.0], [60.0, 50.0, 200.0, 220.0]]) for _ in range(batch)]
    classes = [torch.tensor([1.0, 2.0]) for _ in range(batch)]
    targets = {"bbox": boxes, "cls": classes}

    def label() -> dict:
        cls_targets, box_targets, num_positives = labeler.batch_label_anchors(boxes, classes)
        labelled = {"label_num_positives": num_positives}
        for level, (c, b) in enumerate(zip(cls_targets, box_targets)):
            labelled[f"label_cls_{level}"], labelled[f"label_bbox_{level}"] = c, b
        return labelled

    def timed(fn) -> float:
        fn()
        started = time.perf_counter()
        for _ in range(steps):
            fn()
        return (time.perf_counter() - started) / steps

    def step(net, t) -> None:
        net(images, t)["loss"].backward()

    labelled = label()
    labelling = timed(label)
    # Alternated rounds, medians: the two ways share one machine's ups and downs.
    rounds = [(timed(lambda: step(bench, targets)), timed(lambda: step(prelabelled, labelled)))
              for _ in range(3)]
    in_step = statistics.median(r[0] for r in rounds)
    before = statistics.median(r[1] for r in rounds)
    return [
        f"  cpu, tf_lite0 at {img_size} px, batch {batch} (forward + backward): labelling alone "
        f"{labelling * 1000:.1f} ms per batch; step with labelling in the bench {in_step * 1000:.0f} ms, "
        f"with labels made beforehand (loader workers) {before * 1000:.0f} ms"
    ]


def first_step(base: Path, label: str) -> str:
    env = {**os.environ, "SAGEMAKER_BASE_DIR": str(base), "PYTHONUNBUFFERED": "1",
           "HTTPS_PROXY": "http://127.0.0.1:9"}
    job = subprocess.Popen([sys.executable, str(REPO / "train")], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    seconds = None
    for line in job.stdout:
        found = re.search(r"first training step began ([0-9.]+) s after the process started", line)
        if found:
            seconds = float(found.group(1))
            job.send_signal(signal.SIGTERM)
            break
    job.communicate(timeout=300)
    return f"  {label}: first training step {seconds} s after the process started"


def _percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values), q))


def _rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def wait_healthy(url: str, seconds: float = 300) -> None:
    """Until ./serve at `url` answers /ping with 200 (the model loaded and warmed up)."""
    import requests

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/ping", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)


def untrained_model_folder(folder: Path, img_size: int):
    """A model folder as a job writes it (model.json + weights) for an untrained tf_lite0 with
    3 classes: serving speed and memory do not depend on what the weights learned. Returns the
    effdet bench whose network was written."""
    from sm_effdet.backbones import BACKBONES
    from sm_effdet.model import artifacts
    from sm_effdet.model.efficientdet import build_model
    from sm_effdet.model.preprocessing import backbone_normalization

    bench = build_model("tf_lite0", 3, img_size, pretrained=False, pretrained_dir=None)
    card = {
        "effdet_model_name": BACKBONES["tf_lite0"], "backbone": "tf_lite0", "img_size": img_size,
        "num_classes": 3, "weights_file": artifacts.WEIGHTS_FILE,
        "classes": [{"label": i + 1, "id": i + 1, "name": f"class{i + 1}"} for i in range(3)],
        "normalization": backbone_normalization(BACKBONES["tf_lite0"]),
    }
    artifacts.write_model(folder, bench.model.state_dict(), card)
    return bench


def serving(work: Path, requests_per_run: int, rss_requests: int) -> list[str]:
    """./serve against the plain loop, both on the CPU with the same model and images."""
    import socket
    from concurrent.futures import ThreadPoolExecutor

    import requests
    import torch

    from sm_effdet.model import inference
    from sm_effdet.model.export import export_onnx

    img_size = 256
    base = work / "serve-tree"
    bench = untrained_model_folder(base / "model", img_size)
    folder = jpeg_set(work / "serve-images", 640, 480, 16)
    images = [p.read_bytes() for p in sorted(folder.glob("images/*.jpg"))]

    # The plain loop: decode, preprocess, predict, one image at a time, all cores.
    torch.set_num_threads(os.cpu_count() or 1)
    model, loaded = inference.load_model(base / "model")
    inference.predict(model, loaded, images[0])
    latencies = []
    started = time.perf_counter()
    for i in range(requests_per_run):
        t = time.perf_counter()
        inference.predict(model, loaded, images[i % len(images)])
        latencies.append(time.perf_counter() - t)
    loop_ips = requests_per_run / (time.perf_counter() - started)
    lines = [f"  plain loop (model called directly): {loop_ips:6.1f} img/s, p50 "
             f"{_percentile(latencies, 50) * 1000:.0f} ms, p99 {_percentile(latencies, 99) * 1000:.0f} ms"]
    del model
    # What a job's model folder holds: model.onnx too, which `auto` serves on CPU.
    export_onnx(bench.model, img_size, base / "model" / "model.onnx")
    log = (work / "serve.log").open("w")

    def start_server(backend: str) -> tuple[subprocess.Popen, str]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = {**os.environ, "SAGEMAKER_BASE_DIR": str(base), "SAGEMAKER_BIND_TO_PORT": str(port),
               "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1", "SERVE_BACKEND": backend}
        server = subprocess.Popen([sys.executable, str(REPO / "serve")], env=env, stdout=log,
                                  stderr=subprocess.STDOUT)
        return server, f"http://127.0.0.1:{port}"

    def post(session, url: str, i: int) -> float:
        t = time.perf_counter()
        r = session.post(url + "/invocations", data=images[i % len(images)],
                         headers={"Content-Type": "image/jpeg"}, timeout=120)
        r.raise_for_status()
        return time.perf_counter() - t

    try:
        for backend in ("torch", "onnx"):
            server, url = start_server(backend)
            try:
                wait_healthy(url)
                for concurrency in (1, 8):
                    def client(n: int) -> list[float]:
                        session = requests.Session()
                        return [post(session, url, n + k * concurrency)
                                for k in range(requests_per_run // concurrency)]
                    started = time.perf_counter()
                    with ThreadPoolExecutor(concurrency) as pool:
                        latencies = [t for ts in pool.map(client, range(concurrency)) for t in ts]
                    ips = len(latencies) / (time.perf_counter() - started)
                    lines.append(
                        f"  serve ({backend}), concurrency {concurrency}: {ips:6.1f} img/s = "
                        f"{ips / loop_ips:.2f}x the plain loop, p50 {_percentile(latencies, 50) * 1000:.0f} ms, "
                        f"p99 {_percentile(latencies, 99) * 1000:.0f} ms"
                    )
            finally:
                server.terminate()
                server.wait(60)
        # Memory on a fresh server with the default backend: after 10 requests and after rss_requests.
        server, url = start_server("auto")
        try:
            wait_healthy(url)
            session = requests.Session()
            for i in range(10):
                post(session, url, i)
            after_10 = _rss_mb(server.pid)
            for i in range(10, rss_requests):
                post(session, url, i)
            after_n = _rss_mb(server.pid)
            lines.append(f"  serve (auto: onnx) RSS: {after_10:.0f} MB after 10 requests, "
                         f"{after_n:.0f} MB after {rss_requests} (+{after_n - after_10:.0f} MB)")
        finally:
            server.terminate()
            server.wait(60)
    finally:
        log.close()
    return lines


def generated_detections(n_images: int, per_image: int, classes: int, seed: int = 0):
    """COCO ground truth (1-15 boxes per image) and result rows: noisy copies of the boxes,
    some with the wrong class, with random scores (so that AP is neither 0 nor 1)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    images, annotations, rows = [], [], []
    for i in range(n_images):
        images.append({"id": i, "width": 640, "height": 480})
        n = int(rng.integers(1, 16))
        xy, wh = rng.uniform(0, 500, (n, 2)), rng.uniform(4, 200, (n, 2))
        labels = rng.integers(1, classes + 1, n)
        for b in range(n):
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": int(labels[b]),
                                "bbox": [*xy[b], *wh[b]], "area": float(wh[b].prod()), "iscrowd": 0})
        source = rng.integers(0, n, per_image)
        box = np.concatenate([xy[source], wh[source]], 1) + rng.normal(0, 8, (per_image, 4))
        box[:, 2:] = np.abs(box[:, 2:]) + 1
        label = np.where(rng.random(per_image) < 0.8, labels[source],
                         rng.integers(1, classes + 1, per_image))
        rows.append(np.column_stack([np.full(per_image, i), box, rng.random(per_image), label]))
    gt = {"images": images, "annotations": annotations,
          "categories": [{"id": c} for c in range(1, classes + 1)]}
    return gt, np.concatenate(rows).astype(np.float32)


def evaluation(n_images: int) -> list[str]:
    from sm_effdet.evaluation import coco_eval

    gt, results = generated_detections(n_images, 100, 80)
    seconds, stats = {}, {}
    for evaluator in ("faster-coco-eval", "pycocotools"):
        started = time.perf_counter()
        stats[evaluator] = coco_eval.evaluate(gt, results, evaluator).stats
        seconds[evaluator] = time.perf_counter() - started
    diff = max(abs((stats["faster-coco-eval"][k] or 0) - (stats["pycocotools"][k] or 0))
               for k in coco_eval.STAT_NAMES)
    started = time.perf_counter()
    analysis = coco_eval.analyse_at_iou(gt, results)
    threshold, _ = coco_eval.best_f1_threshold(analysis)
    coco_eval.confusion_matrix(gt, results, threshold)
    extra = time.perf_counter() - started
    fast, slow = seconds["faster-coco-eval"], seconds["pycocotools"]
    return [
        f"  {n_images} images x 100 detections, 80 classes: faster-coco-eval {fast:.2f} s, "
        f"pycocotools {slow:.2f} s = {slow / fast:.1f}x; largest difference of the 12 numbers {diff:.1e}",
        f"  end of job only: IoU-0.5 matching, best-F1 threshold and confusion matrix {extra:.2f} s "
        f"(AP {stats['faster-coco-eval']['AP']:.3f})",
    ]


def epoch_times(base: Path, tensorboard: bool) -> list[float]:
    config = base / "input" / "config" / "hyperparameters.json"
    hyperparameters = json.loads(config.read_text())
    config.write_text(json.dumps({**hyperparameters, "tensorboard": str(tensorboard).lower()}))
    for leftover in ("checkpoints", "model", "output"):  # each run from scratch, not resumed
        subprocess.run(["rm", "-rf", str(base / leftover)], check=True)
    env = {**os.environ, "SAGEMAKER_BASE_DIR": str(base), "HTTPS_PROXY": "http://127.0.0.1:9"}
    out = subprocess.run([sys.executable, str(REPO / "train")], env=env, capture_output=True,
                         text=True, timeout=3600)
    times = [float(t) for t in re.findall(r"\bepoch=\d+/\d+ .*\bepoch_time=([0-9.]+)", out.stdout)]
    if out.returncode or not times:
        raise RuntimeError(f"./train failed: {out.stdout[-2000:]} {out.stderr[-2000:]}")
    return times[1:] or times  # the first epoch also starts the workers


def tensorboard_cost(work: Path, epochs: int, repeats: int) -> list[str]:
    from sm_effdet.demo import DEMO_HYPERPARAMETERS, make_tree

    base = make_tree(work / "tb-tree", hyperparameters={**DEMO_HYPERPARAMETERS, "epochs": str(epochs)})
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(repeats):  # alternated, so that a slow spell of the machine hits both
        for tensorboard in (False, True):
            times[tensorboard] += epoch_times(base, tensorboard)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    return [
        f"  demo dataset, {epochs} epochs x {repeats} runs each: epoch time with TensorBoard "
        f"{on:.2f} s, without {off:.2f} s = {100 * (on / off - 1):+.1f}% (goal within 2%)"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, default=118_000)
    parser.add_argument("--boxes", type=int, default=860_000)
    parser.add_argument("--icevision-images", type=int, default=2_000)
    parser.add_argument("--pipeline-images", type=int, default=48)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--sections", default="1,2,3,4,5,6,7,8,9,10,11,12", help="which parts to run, e.g. 5")
    parser.add_argument("--format-images", type=int, default=118_000)
    parser.add_argument("--format-boxes", type=int, default=860_000)
    parser.add_argument("--decode-requests", type=int, default=20)
    parser.add_argument("--serve-requests", type=int, default=400)
    parser.add_argument("--rss-requests", type=int, default=1000)
    parser.add_argument("--onnx-img-size", type=int, default=512)
    parser.add_argument("--onnx-rounds", type=int, default=3)
    parser.add_argument("--eval-images", type=int, default=5_000)
    parser.add_argument("--tb-epochs", type=int, default=4)
    parser.add_argument("--tb-repeats", type=int, default=2)
    args = parser.parse_args()
    if args.child:
        name, *rest = args.child
        result = CHILDREN[name](*rest)
        # VmHWM starts afresh at exec; ru_maxrss would carry the parent's peak over.
        status = Path("/proc/self/status").read_text()
        result["peak_mb"] = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024
        print(json.dumps(result))
        return

    import torch

    gpu = torch.cuda.is_available()
    print(f"sm-effdet benchmark on {os.cpu_count()} CPUs, "
          f"{torch.cuda.get_device_name() if gpu else 'no GPU'}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="sm-effdet-bench-") as tmp:
        work = Path(tmp)
        sections = {int(x) for x in args.sections.split(",")}
        channel = None
        if 1 in sections:
            print("1. start-up at COCO scale")
            channel, lines = startup(work, args.images, args.boxes, args.icevision_images)
            print("\n".join(lines), flush=True)
        if 2 in sections:
            print("2. input pipeline, 512 px, batch 16, one process")
            print("\n".join(input_pipeline(work, args.pipeline_images, 16)), flush=True)
        if 3 in sections:
            print("3. end to end")
            size, batch = (512, 16) if gpu else (256, 8)
            print("\n".join(end_to_end(work, size, batch, args.steps)), flush=True)
        if 4 in sections:
            print("4. process start to first training step (./train)")
            from sm_effdet.demo import DEMO_HYPERPARAMETERS, make_tree

            demo = make_tree(work / "demo-tree")
            print(first_step(demo, "demo dataset (80 images)"), flush=True)
            if channel is not None:  # the COCO-scale JSON of section 1
                coco_base = channel.parents[2]
                config = coco_base / "input" / "config"
                config.mkdir(parents=True, exist_ok=True)
                (config / "hyperparameters.json").write_text(json.dumps(
                    {**DEMO_HYPERPARAMETERS, "val_fraction": "0.01", "num_workers": "auto"}))
                print(first_step(coco_base, f"COCO-scale JSON ({args.images} images)"), flush=True)
        if 5 in sections:
            print("5. serving on CPU, tf_lite0 at 256 px, 640x480 JPEGs")
            print("\n".join(serving(work, args.serve_requests, args.rss_requests)), flush=True)
        if 6 in sections:
            print("6. PyTorch against ONNX Runtime on CPU (tf_lite0 network + effdet post-processing)")
            print(onnx_vs_pytorch(args.onnx_img_size, args.onnx_rounds), flush=True)
        if 7 in sections:
            print("7. anchor labelling: in the step (effdet's training bench) or in the loader workers")
            print("\n".join(anchor_labelling(256, 8, args.steps)), flush=True)
        if 8 in sections:
            print("8. COCO evaluation: the job's evaluator against pycocotools, same detections")
            print("\n".join(evaluation(args.eval_images)), flush=True)
        if 9 in sections:
            print("9. TensorBoard on against off (./train)")
            print("\n".join(tensorboard_cost(work, args.tb_epochs, args.tb_repeats)), flush=True)
        if 10 in sections:
            print("10. start-up for other formats (YOLO, Pascal VOC) against json.load of the same COCO")
            print("\n".join(other_formats(work, args.format_images, args.format_boxes)), flush=True)
        if 11 in sections:
            print("11. start-up: a Ground Truth manifest at COCO scale")
            print("\n".join(groundtruth_startup(work, channel, args.images, args.boxes)), flush=True)
        if 12 in sections:
            print("12. serving memory: concurrent 39.7-megapixel PNGs, decode budget on and lifted")
            print("\n".join(decode_memory(work, args.decode_requests)), flush=True)


def decode_memory(work: Path, concurrent: int) -> list[str]:
    """Peak RSS of ./serve (VmHWM) for `concurrent` requests of a 39.7-megapixel PNG at once."""
    import io
    import socket
    from concurrent.futures import ThreadPoolExecutor

    import requests
    from PIL import Image

    base = work / "decode-tree"
    untrained_model_folder(base / "model", 256)
    out = io.BytesIO()
    Image.new("RGB", (7280, 5456), (90, 140, 200)).save(out, "PNG")
    png = out.getvalue()
    lines = [f"  {concurrent} concurrent requests, each a 7280x5456 PNG ({len(png) / 1000:.0f} kB)"]
    for label, budget in (("decode budget 80,000,000 px (default)", "80000000"),
                          ("budget lifted (every request decodes at once)", "10000000000")):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = {**os.environ, "SAGEMAKER_BASE_DIR": str(base), "SAGEMAKER_BIND_TO_PORT": str(port),
               "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1", "SERVE_BACKEND": "torch",
               "SERVE_MAX_DECODE_PIXELS": budget}
        with (work / "decode-serve.log").open("a") as log:
            server = subprocess.Popen([sys.executable, str(REPO / "serve")], env=env, stdout=log,
                                      stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url)
            ready = _rss_mb(server.pid)

            def one(_: int) -> int:
                return requests.post(url + "/invocations", data=png, headers={"Content-Type": "image/png"},
                                     timeout=600).status_code

            started = time.perf_counter()
            with ThreadPoolExecutor(concurrent) as pool:
                codes = list(pool.map(one, range(concurrent)))
            seconds = time.perf_counter() - started
            status = Path(f"/proc/{server.pid}/status").read_text()
            peak = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024
            lines.append(
                f"  {label}: RSS {ready:.0f} MB ready, peak {peak:.0f} MB, {_rss_mb(server.pid):.0f} MB "
                f"after; {seconds:.1f} s for all, answers {sorted(set(codes))}"
            )
        finally:
            server.terminate()
            server.wait(60)
    return lines


def onnx_vs_pytorch(img_size: int, rounds: int) -> str:
    result = run_child("onnx_cpu", str(img_size), "1,8", str(rounds))
    lines = [f"  export {result['export_seconds']:.1f} s (with its parity check), "
             f"{result['threads']} threads"]
    for batch in (1, 8):
        rates = result[f"batch_{batch}"]
        lines.append(
            f"  {img_size} px, batch {batch}: PyTorch {rates['torch']:6.2f} img/s, ONNX Runtime "
            f"{rates['onnx']:6.2f} img/s = {rates['onnx'] / rates['torch']:.2f}x"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
