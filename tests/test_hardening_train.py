"""Issue 20, the training side, through the real ./train (and the real ./serve for cut-short
JPEGs): checkpoint retention next to unreadable files, JPEGs whose truncation shows no error,
warm-start messages and memory, class names with `$`, and config files holding `[]`.

Two trainings are shared by the module: a first job (1 epoch) and a job resumed from it beside
two unreadable checkpoints; every other ./train here fails before its first step.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, TRAIN, failure_text, model_files, run_train, train_env, write_tree
from PIL import Image
from safetensors.torch import load_file, save_file
from test_serve import Server

from sm_effdet.training.checkpoints import checkpoint_name, find_resumable, list_checkpoints

HP = {**FAST, "val_fraction": "0.25"}
# Not valid TeX: matplotlib's mathtext refused each of these and lost the plot.
NAMES = {"rectangle": "rect $x^$", "ellipse": "ellipse $\\frac{1$", "triangle": "tri $$ 5$"}


def _jpeg(width: int = 320, height: int = 240, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 200, (10, 14, 3), dtype=np.uint8)
    pixels = np.array(Image.fromarray(small).resize((width, height), Image.BICUBIC))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def half_with_end_marker() -> bytes:
    """Cut in half and closed with an end-of-image marker: Pillow decodes it without an error."""
    data = _jpeg(seed=1)
    return data[: len(data) // 2] + b"\xff\xd9"


def header_claims_6000() -> bytes:
    """A 320x240 JPEG whose frame header says 6000x6000: decoded, most rows are grey."""
    data = bytearray(_jpeg(seed=2))
    at = data.index(b"\xff\xc0")  # SOF0: length (2), precision (1), height (2), width (2)
    data[at + 5 : at + 9] = (6000).to_bytes(2, "big") * 2
    return bytes(data)


def _add_images(base: Path) -> None:
    """The two JPEGs that lost most of their rows, annotated, and the classes renamed."""
    channel = base / "input" / "data" / "training"
    coco = json.loads((channel / "annotations.json").read_text())
    for category in coco["categories"]:
        category["name"] = NAMES[category["name"]]
    category = coco["categories"][0]["id"]
    for k, (name, data, size) in enumerate(
        [("half_eoi.jpg", half_with_end_marker(), 320), ("claims_6000.jpg", header_claims_6000(), 6000)]
    ):
        (channel / "images" / name).write_bytes(data)
        height = 240 if size == 320 else size
        coco["images"].append({"id": 500 + k, "file_name": f"images/{name}", "width": size, "height": height})
        coco["annotations"].append({"id": 9000 + k, "image_id": 500 + k, "category_id": category,
                                    "bbox": [10, 10, 50, 40], "area": 2000, "iscrowd": 0})
    (channel / "annotations.json").write_text(json.dumps(coco))


@pytest.fixture(scope="module")
def first_job(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    base = write_tree(tmp_path_factory.mktemp("first") / "opt_ml", HP, n_images=12)
    _add_images(base)
    result = run_train(base)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return base, result


# --- 6: a JPEG that lost most of its rows is skipped by the job, refused by the server ------

def test_jpegs_cut_short_without_a_decode_error_are_skipped_by_the_job(first_job):
    base, _ = first_job
    report = json.loads((base / "output" / "data" / "data_report.json").read_text())
    skipped = report["examples"]["image_skipped_at_load"]
    assert report["counts"]["image_skipped_at_load"] == 2, skipped
    assert any(r.startswith("images/half_eoi.jpg is cut short: ") for r in skipped), skipped
    assert any(r.startswith("images/claims_6000.jpg is cut short: ") for r in skipped), skipped
    assert "image_truncated_but_used" not in report["counts"]


def test_serve_answers_4xx_for_jpegs_that_lost_most_rows(first_job, tmp_path):
    base, _ = first_job
    server = Server(base, tmp_path / "serve.log", SERVE_MAX_IMAGE_PIXELS="50000000")
    try:
        whole = _jpeg(seed=3)
        cut = whole[: len(whole) * 6 // 10]  # Pillow reports this one; it lost more than a tenth
        png = io.BytesIO()
        noise = np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8)
        Image.fromarray(noise).save(png, "PNG")
        for body, kind in [(half_with_end_marker(), "image/jpeg"), (header_claims_6000(), "image/jpeg"),
                           (cut, "image/jpeg"), (png.getvalue()[:-300], "image/png")]:
            answer = server.post(body, kind)
            assert 400 <= answer.status_code < 500, (answer.status_code, answer.text)
            assert "cut short" in answer.text, answer.text
        assert server.post(whole).status_code == 200  # and it keeps serving
    finally:
        server.stop()


# --- 12: class names with `$` ---------------------------------------------------------------

def test_class_names_with_dollar_signs_are_drawn_as_text(first_job):
    base, result = first_job
    report = base / "output" / "data" / "report"
    log = result.stdout + result.stderr
    assert "could not draw" not in log, log[-3000:]
    for name in ("training_curves", "box_sizes", "pr_curves", "confusion_matrix", "predictions"):
        assert (report / f"{name}.png").stat().st_size > 1000
    assert "rect $x^$" in (report / "index.html").read_text()


# --- 2: retention keeps the job's own checkpoints beside unreadable ones ---------------------

@pytest.fixture(scope="module")
def resumed_job(first_job, tmp_path_factory):
    """The first job resumed for one more epoch, with 2 unreadable files of higher step beside;
    a checkpoint after every step (checkpoint_every_minutes may change on resume) gives three
    saves in the epoch's two steps."""
    first, _ = first_job
    base = tmp_path_factory.mktemp("resumed") / "opt_ml"
    shutil.copytree(first, base, ignore=shutil.ignore_patterns("model", "output"))
    (base / "input" / "config" / "hyperparameters.json").write_text(json.dumps({**HP, "epochs": "2", "checkpoint_every_minutes": "0.0001"}))
    folder = base / "checkpoints"
    (resumed_from,) = list_checkpoints(folder)
    first_step = torch.load(resumed_from, weights_only=True)["global_step"]
    unreadable = {
        folder / checkpoint_name("algo-1", 98, 99_999): os.urandom(3000),  # another run's garbage
        folder / checkpoint_name("algo-1", 97, 99_998): resumed_from.read_bytes()[:5000],  # partial upload
    }
    for path, data in unreadable.items():
        path.write_bytes(data)
    result = run_train(base)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return base, result, resumed_from, unreadable, first_step


def test_retention_keeps_own_checkpoints_and_leaves_unreadable_ones(resumed_job):
    base, result, resumed_from, unreadable, first_step = resumed_job
    log = result.stdout + result.stderr
    assert f"resuming from checkpoint {resumed_from}" in log
    assert "2 checkpoint files cannot be read and are left alone" in log
    for path, data in unreadable.items():
        assert path.read_bytes() == data and path.name in log
    own = [p for p in list_checkpoints(base / "checkpoints") if p not in unreadable]
    steps = [torch.load(p, weights_only=True)["global_step"] for p in own]
    assert len(own) == 2 and steps[0] > steps[1] > first_step, (own, steps)
    assert not resumed_from.exists()  # deleted once two newer ones were written, not before:
    after_resume = log[log.index("resuming from checkpoint"):]
    saves_before = after_resume[: after_resume.index(f"deleted: {resumed_from.name}")].count("checkpoint (every")
    assert saves_before == 2, after_resume[-3000:]
    # A stop now would resume from the job's newest checkpoint, not start from nothing.
    path, info = find_resumable(base / "checkpoints", torch.load(own[0], weights_only=True)["sm_effdet"])
    assert path == own[0] and info["step"] == steps[0]


# --- 7 and 10: warm-start messages and memory ------------------------------------------------

def _warm_tree(tmp_path: Path) -> Path:
    base = write_tree(tmp_path / "opt_ml", HP, n_images=4)
    (base / "input" / "data" / "model").mkdir()
    return base


def _tar(path: Path, members: dict[str, bytes | tuple[int, None]]) -> None:
    """model.tar.gz; a member given as (size, None) is that many zero bytes, streamed."""
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(data, tuple):
                info.size = data[0]
                tar.addfile(info, _Zeros(data[0]))
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


class _Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def _assert_one_sentence_failure(base: Path, code: int, output: str) -> str:
    assert code == 2, output[-3000:]
    reason = failure_text(base)
    assert reason.count("\n") == 1 and reason.endswith(".\n") and "Traceback" not in reason, reason
    assert "sm-effdet-warm-" not in reason and "/tmp" not in reason.replace(str(base), ""), reason
    assert "first training step" not in output and model_files(base) == []
    return reason


def _start(base: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(TRAIN)], env=train_env(base), cwd=base,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> tuple[int, str, int]:
    """Exit code, output, and the process's own peak RSS in MB (wait4, not the test's children)."""
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, output, usage.ru_maxrss // 1024


def _model_files(first: Path) -> tuple[bytes, bytes]:
    return (first / "model" / "model.json").read_bytes(), (first / "model" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("case", ["bad json", "no weights", "not a tar"])
def test_warm_start_errors_name_the_archive_in_one_line(first_job, tmp_path, case):
    card, weights = _model_files(first_job[0])
    base = _warm_tree(tmp_path)
    archive = base / "input" / "data" / "model" / "model.tar.gz"
    if case == "bad json":
        _tar(archive, {"model.json": b"{not json", "model.safetensors": weights})
    elif case == "no weights":
        _tar(archive, {"model/model.json": card})
    else:  # tarfile's reason for this one has four newlines
        archive.write_bytes(b"\x1f\x8b not a tar file at all")
    code, output, _ = _finish(_start(base))
    reason = _assert_one_sentence_failure(base, code, output)
    expected = {
        "bad json": f"model.json in {archive} is not readable JSON",
        "no weights": f"{archive} holds no model.safetensors; ",
        "not a tar": f"cannot read {archive} (ReadError: file could not be opened successfully: - method gz: ",
    }[case]
    assert reason.startswith(expected), reason


def test_nan_starting_weights_are_blamed_on_the_model_channel_and_a_big_member_is_streamed(first_job, tmp_path):
    card, _ = _model_files(first_job[0])
    nan = _warm_tree(tmp_path / "nan")
    state = load_file(str(first_job[0] / "model" / "model.safetensors"))
    key = next(k for k, v in state.items() if k.startswith("backbone.") and v.is_floating_point())
    state[key][0] = float("nan")
    channel = nan / "input" / "data" / "model"
    (channel / "model.json").write_bytes(card)
    save_file(state, str(channel / "model.safetensors"))
    # 10: a 500 MB member (zeros, 0.5 MB gzipped) copied to disk in chunks, not read into memory.
    big = _warm_tree(tmp_path / "big")
    archive = big / "input" / "data" / "model" / "model.tar.gz"
    _tar(archive, {"model.json": card, "model.safetensors": (500 << 20, None)})
    runs = {"nan": _start(nan), "big": _start(big)}  # side by side: each start-up costs minutes here
    (code, output, nan_peak), (big_code, big_output, big_peak) = (_finish(p) for p in runs.values())

    reason = _assert_one_sentence_failure(nan, code, output)
    assert reason.startswith(f"the starting weights in {channel} (the 'model' channel) hold non-finite values"), reason
    assert "learning_rate" not in reason and "diverged" not in reason

    reason = _assert_one_sentence_failure(big, big_code, big_output)
    assert reason.startswith(f"cannot read weights file model.safetensors in {archive} "), reason
    # Both fail in warm_start with the same model built; read whole, the member added 380+ MB.
    assert big_peak < nan_peak + 150, (big_peak, nan_peak)


# --- 13: `[]` as a config file ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["inputdataconfig.json", "resourceconfig.json"])
def test_an_empty_list_as_config_fails_naming_the_file(tmp_path, name):
    base = write_tree(tmp_path / "opt_ml", FAST, n_images=4)
    (base / "input" / "config" / name).write_text("[]")
    result = run_train(base, timeout=120)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    reason = failure_text(base)
    assert reason.startswith(f"{base / 'input' / 'config' / name} must be a JSON object"), reason
    assert "not []" in reason and reason.count("\n") == 1
