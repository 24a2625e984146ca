"""A job's life: stopped with SIGTERM, started again, resumed; fed data nobody checked."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import numpy as np
from conftest import FAST, failure_text, model_files, run_train, start_train, write_tree
from PIL import Image

from sm_effdet.training.checkpoints import list_checkpoints


def read_until(process: subprocess.Popen, pattern: str, timeout: float = 400) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if re.search(pattern, line):
            return lines
    raise AssertionError(f"never saw {pattern!r}:\n{''.join(lines[-30:])}")


def test_sigterm_checkpoints_then_a_new_start_resumes_and_finishes(tmp_path):
    base = write_tree(
        tmp_path / "opt_ml",
        {**FAST, "epochs": "3", "batch_size": "2", "num_workers": "2", "val_fraction": "0.2"},
        n_images=20,
    )
    job = start_train(base)
    read_until(job, r"epoch=1/3 ")
    time.sleep(1.5)  # into the second epoch
    job.send_signal(signal.SIGTERM)
    rest, _ = job.communicate(timeout=120)  # SageMaker's grace period before SIGKILL
    assert job.returncode == 143, rest[-3000:]
    reason = failure_text(base).splitlines()[0]
    assert re.match(r"training was stopped by SIGTERM in epoch 2 at step \d+; checkpoint checkpoint-algo-1-epoch0001-step\d+\.ckpt was written", reason), reason
    assert "run the job again with the same checkpoint location to resume" in reason
    assert model_files(base) == []  # nothing that looks like a finished model
    stopped_at = int(re.search(r"at step (\d+)", reason).group(1))
    assert len(list_checkpoints(base / "checkpoints")) <= 2
    # No process of the stopped job is left behind (data loader workers included).
    leftover = subprocess.run(["pgrep", "-f", str(base)], capture_output=True, text=True).stdout.split()
    assert leftover == []

    (base / "output" / "failure").unlink()
    result = run_train(base)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    resumed = re.search(r"resuming from checkpoint \S+checkpoint-algo-1-epoch0001-step(\d+)\.ckpt \(epoch 2, step (\d+)\)", result.stdout)
    assert resumed, result.stdout[-3000:]
    assert int(resumed.group(2)) == stopped_at
    assert "epoch=1/3" not in result.stdout and "epoch=3/3" in result.stdout
    meta = json.loads((base / "model" / "model.json").read_text())
    assert [h["epoch"] for h in meta["history"]] == [1, 2, 3]
    assert meta["best_epoch"] in (1, 2, 3)


def test_ctrl_c_stops_like_sigterm(tmp_path):
    base = write_tree(tmp_path / "opt_ml", {**FAST, "epochs": "3", "batch_size": "2", "val_fraction": "0"}, n_images=12)
    job = start_train(base)
    read_until(job, r"epoch=1/3 ")
    job.send_signal(signal.SIGINT)
    rest, _ = job.communicate(timeout=120)
    assert job.returncode == 130, rest[-3000:]
    reason = failure_text(base).splitlines()[0]
    assert re.match(r"training was stopped by SIGINT \(Ctrl-C\) in epoch \d at step \d+; checkpoint checkpoint-algo-1-", reason), reason
    assert len(list_checkpoints(base / "checkpoints")) >= 1
    assert model_files(base) == []


def test_hostile_dataset_trains_and_reports_everything(tmp_path):
    base = write_tree(tmp_path / "opt_ml", {**FAST, "val_fraction": "0", "batch_size": "4"}, n_images=8)
    channel = base / "input" / "data" / "training"
    coco = json.loads((channel / "annotations.json").read_text())
    images = channel / "images"
    add = []
    Image.new("L", (64, 48), 128).save(images / "grey.png")
    Image.new("RGBA", (64, 48), (200, 10, 10, 100)).save(images / "rgba.png")
    Image.new("P", (64, 48), 3).save(images / "palette.png")
    Image.fromarray(np.full((48, 64), 40000, np.uint16)).save(images / "deep.png")
    (images / "truncated.jpg").write_bytes((images / "shape_00000.jpg").read_bytes()[:300])
    Image.new("1", (15000, 15000)).save(images / "bomb.png")  # header says 225 MP
    os.mkfifo(channel.parent / "secret.jpg")  # opening it would hang the job
    for i, (name, w, h) in enumerate([
        ("grey.png", 64, 48), ("rgba.png", 64, 48), ("palette.png", 64, 48), ("deep.png", 64, 48),
        ("truncated.jpg", 320, 240), ("bomb.png", 100, 100), ("missing.jpg", 64, 48),
        ("../secret.jpg", 64, 48), ("/etc/hostname", 64, 48),
    ]):
        image_id = 500 + i
        add.append({"id": image_id, "file_name": name if name.startswith(("/", "..")) else f"images/{name}", "width": w, "height": h})
        coco["annotations"].append({"id": 9000 + i, "image_id": image_id, "category_id": 3, "bbox": [5, 5, 30, 30], "iscrowd": 0})
    coco["images"] += add
    coco["annotations"] += [
        {"id": 9900, "image_id": 1, "category_id": 3, "bbox": [-20, -20, 60, 60]},
        {"id": 9901, "image_id": 1, "category_id": 3, "bbox": [0, 0, 0, 10]},
        {"id": 9902, "image_id": 1, "category_id": 3, "bbox": [10, 10, 50, 50], "iscrowd": 1},
        {"id": 9903, "image_id": 1, "category_id": 99, "bbox": [10, 10, 5, 5]},
        {"id": 9904, "image_id": 77777, "category_id": 3, "bbox": [10, 10, 5, 5]},
    ]
    (channel / "annotations.json").write_text(json.dumps(coco))

    result = run_train(base, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((base / "output" / "data" / "data_report.json").read_text())
    counts = report["counts"]
    assert counts["image_skipped_unsafe_file_name"] == 2
    assert counts["image_skipped_missing_file"] == 1
    assert counts["image_skipped_at_load"] == 2  # truncated.jpg and bomb.png, found while training
    assert any("truncated.jpg" in e for e in report["examples"]["image_skipped_at_load"])
    assert any("bomb.png has more pixels than the limit" in e for e in report["examples"]["image_skipped_at_load"])
    assert counts["box_clipped_to_image"] == 1 and counts["box_dropped_zero_or_negative_size"] == 1
    assert counts["crowd_regions_ignored"] == 1
    assert counts["box_dropped_unknown_category"] == 1 and counts["box_dropped_unknown_image"] == 1
    assert re.search(r"epoch=1/1 .*images_skipped=2\b", result.stdout)
    assert "image_skipped_at_load=2" in result.stdout  # the summary at the end of the log
    assert model_files(base) == ["inference.py", "model.json", "model.safetensors", "model_card.py", "preprocessing.py"]
