"""The end-of-job report, model.json's per-class numbers and TensorBoard, from one real ./train
run on generated shapes (module-scoped: every test reads the same run)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST, REPO, run_train, write_tree

from sm_effdet.data.formats import DataReport
from sm_effdet.evaluation import coco_eval, report

PLOTS = ("training_curves", "pr_curves", "confusion_matrix", "box_sizes", "predictions")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    base = write_tree(
        tmp_path_factory.mktemp("report") / "opt_ml", {**FAST, "epochs": "2"}, n_images=16,
        validation_images=8,
    )
    result = run_train(base)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return base, result.stdout + result.stderr


def report_dir(base: Path) -> Path:
    return base / "output" / "data" / "report"


def model_card(base: Path) -> dict:
    return json.loads((base / "model" / "model.json").read_text())


def validation_coco(base: Path) -> dict:
    return json.loads((base / "input" / "data" / "validation" / "annotations.json").read_text())


def test_every_report_file_is_written(job):
    base, log = job
    folder = report_dir(base)
    for name in PLOTS:
        assert (folder / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    for name in ("index.html", "detections.json", "confusion_matrix.json"):
        assert (folder / name).stat().st_size > 0, name
    assert list((base / "output" / "tensorboard").glob("events.out.tfevents.*"))
    seconds = float(re.search(r"report written to \S+ in ([0-9.]+) s", log).group(1))
    assert seconds < 15  # a few seconds; generous for a loaded 2-core test machine


def test_model_json_holds_coco_numbers_per_class_table_and_threshold(job):
    base, log = job
    card = model_card(base)
    assert list(card["metrics"]["coco"]) == list(coco_eval.STAT_NAMES)
    names = {c["id"]: c["name"] for c in card["classes"]}
    assert [(r["id"], r["name"]) for r in card["metrics"]["per_class"]] == list(names.items())
    assert 0 < card["recommended_score_threshold"] <= 1
    # The same table in the log.
    for row in card["metrics"]["per_class"]:
        assert re.search(rf"^{row['name']}\s+{row['id']}\s+\S+\s+\S+\s+{row['boxes']}$",
                         log, re.MULTILINE), row


def test_epoch_line_has_ap_per_size_and_definitions_match(job):
    _, log = job
    definitions = {d["Name"]: d["Regex"] for d in json.loads((REPO / "metric_definitions.json").read_text())}
    lines = [l for l in log.splitlines() if " epoch=" in l]
    found = 0
    for name in ("validation:mAP_small", "validation:mAP_medium", "validation:mAP_large"):
        matches = [re.search(definitions[name], l) for l in lines]
        found += all(matches)
    # The shapes are medium and large (no box under 32x32 px, where COCO has no small AP).
    assert found == 2 and "valid_map_small" not in log


def pycocotools_eval(gt: dict, detections: list[dict]):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(detections), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def faster_eval(gt: dict, detections: list[dict]):
    from faster_coco_eval import COCO, COCOeval_faster

    coco_gt = COCO()
    coco_gt.dataset = gt
    coco_gt.createIndex()
    evaluator = COCOeval_faster(coco_gt, coco_gt.loadRes(detections), "bbox", print_function=lambda *a: None)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator


def test_per_class_table_matches_pycocotools_on_the_saved_detections(job):
    base, _ = job
    gt = validation_coco(base)
    detections = json.loads((report_dir(base) / "detections.json").read_text())
    assert detections and {d["image_id"] for d in detections} <= {i["id"] for i in gt["images"]}
    evaluator = pycocotools_eval(gt, detections)
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    card = model_card(base)
    for k, category in enumerate(evaluator.params.catIds):
        row = next(r for r in card["metrics"]["per_class"] if r["id"] == category)
        every, at_50 = precision[:, :, k], precision[0, :, k]
        assert row["AP"] == pytest.approx(every[every > -1].mean(), abs=1e-4)
        assert row["AP50"] == pytest.approx(at_50[at_50 > -1].mean(), abs=1e-4)
        assert row["boxes"] == sum(a["category_id"] == category for a in gt["annotations"])
    for name, value in zip(coco_eval.STAT_NAMES, evaluator.stats):
        expected = card["metrics"]["coco"][name]
        assert (value if value >= 0 else None) == pytest.approx(expected, abs=1e-4), name


def synthetic(n_images: int = 40, dets: int = 30, classes: int = 5, seed: int = 0):
    """Ground truth and detections that are noisy copies of it: non-trivial AP and confusions."""
    rng = np.random.default_rng(seed)
    images, annotations, rows = [], [], []
    for i in range(n_images):
        images.append({"id": i, "width": 640, "height": 480})
        n = int(rng.integers(1, 12))
        xy, wh = rng.uniform(0, 400, (n, 2)), rng.uniform(8, 220, (n, 2))
        labels = rng.integers(1, classes + 1, n)
        for b in range(n):
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": int(labels[b]),
                                "bbox": [*xy[b], *wh[b]], "area": float(wh[b].prod()), "iscrowd": 0})
        source = rng.integers(0, n, dets)
        box = np.concatenate([xy[source], wh[source]], 1) + rng.normal(0, 6, (dets, 4))
        box[:, 2:] = np.abs(box[:, 2:]) + 1
        label = np.where(rng.random(dets) < 0.8, labels[source], rng.integers(1, classes + 1, dets))
        rows.append(np.column_stack([np.full(dets, i), box, rng.random(dets), label]))
    gt = {"images": images, "annotations": annotations,
          "categories": [{"id": c} for c in range(1, classes + 1)]}
    return gt, np.concatenate(rows).astype(np.float32)


def test_faster_coco_eval_and_pycocotools_give_the_same_12_numbers(job):
    base, _ = job
    # On the job's real output...
    gt = validation_coco(base)
    detections = json.loads((report_dir(base) / "detections.json").read_text())
    np.testing.assert_allclose(faster_eval(gt, detections).stats[:12],
                               pycocotools_eval(gt, detections).stats[:12], atol=1e-4)
    # ...and, since a 2-epoch model from scratch finds little, on detections that score well.
    gt, results = synthetic()
    fast = coco_eval.evaluate(gt, results, "faster-coco-eval")
    slow = coco_eval.evaluate(gt, results, "pycocotools")
    assert fast.stats["AP50"] > 0.2
    for name in coco_eval.STAT_NAMES:
        assert fast.stats[name] == pytest.approx(slow.stats[name], abs=1e-4), name
    for label in fast.class_ap:
        assert fast.class_ap[label] == pytest.approx(slow.class_ap[label], abs=1e-4)


def check_confusion_adds_up(matrix: np.ndarray, gt: dict, results: np.ndarray, threshold: float) -> None:
    labels = [c["id"] for c in gt["categories"]]
    kept = results[results[:, 5] >= threshold]
    k = len(labels)
    assert matrix.shape == (k + 1, k + 1) and matrix[k, k] == 0
    for i, label in enumerate(labels):
        # row: every validation box of the class, found as some class or missed (background)
        assert matrix[i].sum() == sum(a["category_id"] == label for a in gt["annotations"])
        # column: every detection of the class at or above the threshold
        assert matrix[:, i].sum() == int((kept[:, 6] == i + 1).sum())


def test_confusion_matrix_adds_up_to_boxes_and_detections(job):
    base, _ = job
    saved = json.loads((report_dir(base) / "confusion_matrix.json").read_text())
    card = model_card(base)
    assert saved["score_threshold"] == pytest.approx(card["recommended_score_threshold"], abs=1e-4)
    gt = validation_coco(base)
    detections = json.loads((report_dir(base) / "detections.json").read_text())
    ids = [c["id"] for c in card["classes"]]
    # the saved detections with labels 1..K again, to count them per column
    results = np.array([[0, *d["bbox"], d["score"], ids.index(d["category_id"]) + 1] for d in detections])
    check_confusion_adds_up(np.array(saved["matrix"]), gt, results, saved["score_threshold"])
    # With confusions and hits in it, on the synthetic set at a lower threshold.
    gt, results = synthetic()
    matrix = coco_eval.confusion_matrix(gt, results, 0.3)
    assert np.trace(matrix) > 0 and matrix[:-1, :-1].sum() > np.trace(matrix)
    check_confusion_adds_up(matrix, gt, results, 0.3)


def test_best_f1_threshold_gives_the_best_f1():
    gt, results = synthetic()
    analysis = coco_eval.analyse_at_iou(gt, results)
    threshold, f1 = coco_eval.best_f1_threshold(analysis)
    boxes = analysis.boxes_per_class.sum()
    for t in np.linspace(0, 1, 41):
        kept = analysis.scores >= t
        tp = analysis.true_positive[kept].sum()
        other = 2 * tp / max(kept.sum() + boxes, 1)
        assert other <= f1 + 1e-9
    kept = analysis.scores >= threshold
    assert 2 * analysis.true_positive[kept].sum() / (kept.sum() + boxes) == pytest.approx(f1)


def test_tensorboard_events_hold_the_scalars_and_the_mosaic(job):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    base, _ = job
    events = EventAccumulator(str(base / "output" / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    for tag in ("epoch/train_loss", "epoch/valid_loss", "epoch/valid_map", "epoch/valid_map_50",
                "epoch/lr", "epoch/images_per_second", "epoch/epoch_time",
                "step/train_loss", "step/lr", "step/images_per_second"):
        assert tag in tags["scalars"], tag
    assert [e.step for e in events.Scalars("epoch/valid_map")] == [1, 2]
    card = model_card(base)
    losses = [e.value for e in events.Scalars("epoch/train_loss")]
    assert losses == pytest.approx([h["train_loss"] for h in card["history"]], rel=1e-5)
    assert "validation/predictions" in tags["images"]


def test_html_report_is_self_contained(job):
    base, _ = job
    page = (report_dir(base) / "index.html").read_text()
    sources = re.findall(r"src='([^']*)'", page)
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert not re.search(r"https?:|//[a-z0-9]|ftp:|<script|<link|@import|url\(", text, re.IGNORECASE)
    assert len(sources) == len(PLOTS) and all(s.startswith("data:image/png;base64,") for s in sources)
    for name in PLOTS:
        assert f"id='{name}'" in page
    for row in model_card(base)["metrics"]["per_class"]:
        assert f"<td>{row['name']}</td>" in page


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_html_report_renders_in_headless_chromium(job, tmp_path):
    from PIL import Image

    base, _ = job
    page = (report_dir(base) / "index.html").read_text()
    # A copy that writes each image's decoded width into the DOM, to read back with --dump-dom.
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", "<script>window.onload = () => { for (const i of "
                                  "document.images) i.setAttribute('data-decoded', i.naturalWidth); }"
                                  "</script></body>"))
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000"]
    dom = subprocess.run(flags + ["--dump-dom", probe.as_uri()], check=False,
                         capture_output=True, text=True, timeout=120).stdout
    widths = [int(w) for w in re.findall(r'data-decoded="(\d+)"', dom)]
    assert len(widths) == len(PLOTS) and all(w > 100 for w in widths), widths
    shot = tmp_path / "page.png"
    subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1400,2400",
                            (report_dir(base) / "index.html").as_uri()],
                   check=False, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    # Plots are anti-aliased: hundreds of colours, where a blank or text-only page has few.
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200


def test_a_drawing_error_is_logged_and_the_page_still_written(tmp_path, caplog):
    folder = tmp_path / "report"
    broken_history = [{"train_loss": 1.0}]  # no "epoch": the curves cannot be drawn
    with caplog.at_level("ERROR"):
        written = report.write_report(folder, None, [], [], [], DataReport(), {"epochs": 1},
                                      broken_history, None)
    assert "could not draw training_curves" in caplog.text
    assert folder / "index.html" in written and not (folder / "training_curves.png").exists()
    assert (folder / "box_sizes.png").exists()
