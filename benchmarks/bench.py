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

The sections live by concern beside this file: bench_data.py (1, 2, 10, 11), bench_train.py
(3, 4, 7, 9), bench_serve.py (5, 6, 12) and bench_eval.py (8); bench_common.py holds what they
and gpu_check.py share. This file parses the arguments, runs the chosen sections in order and
prints their lines, and runs a section's child when called with --child.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
# The sections' modules, importable even where the script's folder is not put on the path
# (python -P, PYTHONSAFEPATH).
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_data  # noqa: E402
import bench_eval  # noqa: E402
import bench_serve  # noqa: E402
import bench_train  # noqa: E402

# Each measured in a process of its own (its peak memory, its imports): bench_common.run_child
# calls this file with --child NAME ARGS.
CHILDREN = {
    f.__name__[len("child_"):]: f
    for f in (bench_data.child_json_load, bench_data.child_job_dataset,
              bench_data.child_icevision_parser, bench_serve.child_onnx_cpu,
              bench_data.child_format_read, bench_data.child_image_headers,
              bench_data.child_groundtruth_read, bench_data.child_worker_start)
}


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
            channel, lines = bench_data.startup(work, args.images, args.boxes,
                                                args.icevision_images)
            print("\n".join(lines), flush=True)
        if 2 in sections:
            print("2. input pipeline, 512 px, batch 16, one process")
            print("\n".join(bench_data.input_pipeline(work, args.pipeline_images, 16)), flush=True)
        if 3 in sections:
            print("3. end to end")
            size, batch = (512, 16) if gpu else (256, 8)
            print("\n".join(bench_train.end_to_end(work, size, batch, args.steps)), flush=True)
        if 4 in sections:
            print("4. process start to first training step (./train)")
            for line in bench_train.first_steps(work, channel, args.images):
                print(line, flush=True)
        if 5 in sections:
            print("5. serving on CPU, tf_lite0 at 256 px, 640x480 JPEGs")
            print("\n".join(bench_serve.serving(work, args.serve_requests, args.rss_requests)),
                  flush=True)
        if 6 in sections:
            print("6. PyTorch against ONNX Runtime on CPU (tf_lite0 network + effdet post-processing)")
            print(bench_serve.onnx_vs_pytorch(args.onnx_img_size, args.onnx_rounds), flush=True)
        if 7 in sections:
            print("7. anchor labelling: in the step (effdet's training bench) or in the loader workers")
            print("\n".join(bench_train.anchor_labelling(256, 8, args.steps)), flush=True)
        if 8 in sections:
            print("8. COCO evaluation: the job's evaluator against pycocotools, same detections")
            print("\n".join(bench_eval.evaluation(args.eval_images)), flush=True)
        if 9 in sections:
            print("9. TensorBoard on against off (./train)")
            print("\n".join(bench_train.tensorboard_cost(work, args.tb_epochs, args.tb_repeats)),
                  flush=True)
        if 10 in sections:
            print("10. start-up for other formats (YOLO, Pascal VOC) against json.load of the same COCO")
            print("\n".join(bench_data.other_formats(work, args.format_images, args.format_boxes)),
                  flush=True)
        if 11 in sections:
            print("11. start-up: a Ground Truth manifest at COCO scale")
            print("\n".join(bench_data.groundtruth_startup(work, channel, args.images, args.boxes)),
                  flush=True)
        if 12 in sections:
            print("12. serving memory: concurrent 39.7-megapixel PNGs, decode budget on and lifted")
            print("\n".join(bench_serve.decode_memory(work, args.decode_requests)), flush=True)


if __name__ == "__main__":
    main()
