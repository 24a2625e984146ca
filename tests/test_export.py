"""model.onnx: written by the real ./train, same detections as PyTorch, optional for the job."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FAST, REPO, model_files, run_train, write_tree

from sm_effdet.model import artifacts, preprocessing
from sm_effdet.model.export import OnnxEfficientDet
from sm_effdet.model.inference import infer, load_model, preprocess

# ../shared beside the checkout (CI clones main with shared/ beside it).
RACCOON_IMAGES = REPO.parent / "shared" / "data" / "raccoon" / "images"
# Detections compared: those PyTorch scores above this (an untrained-looking 1-epoch model
# scores low, so the bar is low too; it still leaves dozens of boxes per image).
MIN_SCORE = 0.01


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, str]:
    base = write_tree(tmp_path_factory.mktemp("onnx") / "opt_ml", {**FAST, "export_onnx": "true"}, n_images=16)
    result = run_train(base)
    assert result.returncode == 0, result.stderr[-3000:]
    return base, result.stdout + result.stderr


def test_job_writes_onnx_and_records_it(trained):
    base, log = trained
    assert model_files(base) == sorted([*artifacts.MODEL_FILES, artifacts.ONNX_FILE])
    meta = json.loads((base / "model" / "model.json").read_text())
    record = meta["onnx"]
    assert record["file"] == artifacts.ONNX_FILE
    assert record["opset"] >= 17
    assert record["inputs"]["images"] == ["batch", 3, 256, 256]
    assert record["max_relative_difference"] <= 1e-3
    assert "onnx_error" not in meta
    (line,) = [ln for ln in log.splitlines() if "ONNX export: model.onnx" in ln]
    assert "parity check" in line


def _images(base: Path, tmp_path: Path) -> list[Path]:
    generated = sorted((base / "input" / "data" / "training" / "images").glob("*.jpg"))[:3]
    photos = sorted(RACCOON_IMAGES.glob("*.jpg"))[:1] if RACCOON_IMAGES.is_dir() else []
    copies = []
    for photo in photos:  # copied at test time; never part of the repository
        copies.append(tmp_path / photo.name)
        shutil.copyfile(photo, copies[-1])
    return generated + copies


def _detections(bench: torch.nn.Module, meta: dict, path: Path) -> torch.Tensor:
    """effdet rows [x1, y1, x2, y2, score, label] for one image, through the shared preprocessing."""
    array, size = preprocessing.decode_image(path, meta["img_size"])
    batch, _ = preprocess([array], meta)
    with torch.no_grad():
        return torch.from_numpy(infer(bench, meta, batch, [size])[0])


def test_onnx_runtime_detections_match_pytorch(trained, tmp_path):
    base, _ = trained
    model_dir = base / "model"
    torch_bench, meta = load_model(model_dir)
    onnx_bench, _ = load_model(model_dir)
    onnx_bench.model = OnnxEfficientDet(model_dir / artifacts.ONNX_FILE)

    images = _images(base, tmp_path)
    compared, box_diff, score_diff = 0, 0.0, 0.0
    for path in images:
        want = _detections(torch_bench, meta, path)
        got = _detections(onnx_bench, meta, path)
        keep = int((want[:, 4] > MIN_SCORE).sum())
        assert keep > 0, f"no detection above {MIN_SCORE} in {path.name}"
        # Each of PyTorch's detections above MIN_SCORE against ONNX Runtime's of its class and
        # nearest score, the closest box among those: two detections whose scores differ by
        # less than the kernels' rounding may trade ranks (seen with other thread counts).
        for row in want[:keep]:
            same = got[(got[:, 5] == row[5]) & ((got[:, 4] - row[4]).abs() <= 1e-3)]
            assert len(same), f"{path.name}: no ONNX detection of class {int(row[5])} near score {float(row[4]):.4f}"
            box_diff = max(box_diff, float((same[:, :4] - row[:4]).abs().max(dim=1).values.min()))
            score_diff = max(score_diff, float((same[:, 4] - row[4]).abs().min()))
        compared += keep
    print(f"{compared} detections on {len(images)} images: max box difference {box_diff:.2e} "
          f"px, max score difference {score_diff:.2e}")
    assert box_diff <= 1.0
    assert score_diff <= 1e-3


def test_failed_export_leaves_a_successful_job(tmp_path):
    # A real failure of the real check: with a tolerance of 0 the tiny float differences
    # between ONNX Runtime's and PyTorch's kernels are refused, as a broken export would be.
    base = write_tree(tmp_path / "opt_ml", {**FAST, "export_onnx": "true"}, n_images=8)
    result = run_train(base, SM_EFFDET_ONNX_TOLERANCE="0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert model_files(base) == sorted(artifacts.MODEL_FILES)
    meta = json.loads((base / "model" / "model.json").read_text())
    assert meta["onnx"] is None
    assert "more than the tolerance 0e+00" in meta["onnx_error"]
    log = result.stdout + result.stderr
    (line,) = [ln for ln in log.splitlines() if "no ONNX export" in ln]
    assert "the PyTorch model is written as usual" in line
    assert not (base / "output" / "failure").exists()


def test_a_later_model_without_onnx_removes_the_earlier_onnx(tmp_path):
    model_dir = tmp_path / "model"
    extra = tmp_path / "scratch" / artifacts.ONNX_FILE
    extra.parent.mkdir()
    extra.write_bytes(b"first model's network")
    state = {"w": torch.zeros(2)}
    artifacts.write_model(model_dir, state, {"onnx": {"file": extra.name}}, [extra])
    assert (model_dir / artifacts.ONNX_FILE).read_bytes() == b"first model's network"
    artifacts.write_model(model_dir, state, {"onnx": None}, [])
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(artifacts.MODEL_FILES)


def test_serve_runs_model_onnx_with_the_same_detections(trained, tmp_path):
    """SERVE_BACKEND=onnx and auto (on CPU with model.onnx: ONNX Runtime) answer as torch does."""
    from test_serve import Server

    base, _ = trained
    image = sorted((base / "input" / "data" / "training" / "images").glob("*.jpg"))[0].read_bytes()
    attrs = {"X-Amzn-SageMaker-Custom-Attributes": f"score_threshold={MIN_SCORE}"}
    answers = {}
    for backend in ("torch", "onnx", "auto"):
        server = Server(base, tmp_path / f"serve-{backend}.log", SERVE_BACKEND=backend)
        try:
            response = server.post(image, **attrs)
            assert response.status_code == 200, response.text
            answers[backend] = response.json()
        finally:
            server.stop()
        log = (tmp_path / f"serve-{backend}.log").read_text()
        expected = "onnx" if backend == "auto" else backend
        assert f"backend {expected} on cpu" in log, log[-2000:]
    want = answers["torch"]["predictions"][0]["detections"]
    for backend in ("onnx", "auto"):
        got = answers[backend]["predictions"][0]["detections"]
        keep = max(len(want) - 2, 0)  # the last rows may trade places with the first rows dropped
        assert keep > 0
        for a, b in zip(want[:keep], got[:keep]):
            assert a["category_id"] == b["category_id"]
            assert max(abs(x - y) for x, y in zip(a["box"], b["box"])) <= 1.0
            assert abs(a["score"] - b["score"]) <= 1e-3
