"""The GPU check (`make gpu-check`) run for real in its --cpu mode: the same six parts, the same
JSON keys, tiny sizes, so that the script a GPU machine runs cannot rot between loans."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
PARTS = ("train", "loader", "model_loop", "serve", "fp16", "sigterm")


# On the shared 2-core machine this file took 8.5 minutes (3 minutes of CPU) at a load average
# of 10 to 13 (with 24 images instead of 8 the check alone once ran past the budget at 12 to
# 14): the budget is for such a machine, so that a broken part fails the test, not a slow one.
BUDGET_S = 1100


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check-out")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "GPU_CHECK_BUDGET_S": str(BUDGET_S)}
    run = subprocess.run(["bash", str(SCRIPT), "--cpu"], env=env, check=False,
                         capture_output=True, text=True, timeout=BUDGET_S + 120)
    result = json.loads((out / "gpu_check.json").read_text())
    return run, result


@pytest.mark.timeout(BUDGET_S + 180)  # the first test to use the fixture waits for the check
def test_every_part_runs_and_the_script_exits_0(cpu_check):
    run, result = cpu_check
    failed = {name: result[name]["error"] for name in PARTS if "error" in result[name]}
    assert not failed, failed
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "every part ran" in run.stdout
    assert result["machine"]["mode"] == "cpu" and result["machine"]["gpu"] is None


def test_train_figures_for_both_backbones(cpu_check):
    _, result = cpu_check
    assert set(result["train"]) - {"seconds"} == {"tf_lite0", "larger"}
    for key, backbone in (("tf_lite0", "tf_lite0"), ("larger", "tf_d0")):
        figures = result["train"][key]
        assert figures["backbone"] == backbone
        assert figures["accelerator"] == "cpu" and figures["precision"] == "32"  # auto on CPU
        assert figures["images_per_second_per_epoch"] and all(r > 0 for r in figures["images_per_second_per_epoch"])
        assert figures["first_step_seconds"] > 0 and figures["peak_memory_mb"] > 0
        search = figures["batch_search"]
        assert search["largest_batch"] == 2 and search["search_capped"]  # the --cpu cap
        assert [t["batch"] for t in search["tried"]] == [1, 2]


def test_loader_and_model_loop_figures(cpu_check):
    _, result = cpu_check
    loader = result["loader"]
    assert loader["model_only_images_per_second"] > 0
    for name in ("all_cores", "4_cores"):
        assert loader[name]["num_workers"] >= 1 and loader[name]["job_loop_images_per_second"] > 0
        assert loader[name]["job_over_model_only"] > 0
    loop = result["model_loop"]
    assert loop["compile_backend"] == "eager"
    for name in ("eager", "channels_last", "compile"):
        assert loop[name]["images_per_second"] > 0, loop[name]


def test_serve_against_the_plain_loop(cpu_check):
    _, result = cpu_check
    serve = result["serve"]
    assert "backend torch on cpu" in serve["server"]
    for name in ("plain_loop", "concurrency_1", "concurrency_8"):
        assert serve[name]["images_per_second"] > 0 and 0 < serve[name]["p50_ms"] <= serve[name]["p99_ms"]
    assert serve["concurrency_8"]["over_plain_loop"] > 0


def test_half_precision_epoch_writes_a_model(cpu_check):
    _, result = cpu_check
    fp16 = result["fp16"]
    assert fp16["precision"] == "bf16-mixed"  # Lightning has no 16-mixed on CPU
    assert math.isfinite(fp16["train_loss"])
    assert {"model.safetensors", "model.json"} <= set(fp16["model_files"])


def test_sigterm_mid_epoch_leaves_a_resumable_checkpoint(cpu_check):
    _, result = cpu_check
    stop = result["sigterm"]
    assert stop["exit_code"] == 143 and stop["stopped_mid_epoch"], stop
    assert stop["checkpoints"] and stop["failure"].startswith("training was stopped by SIGTERM in epoch 1")
    assert stop["resumed_exit_code"] == 0 and stop["model_after_resume"]


def test_gpu_run_without_wheels_says_what_to_do(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "WHEEL_DIR": str(tmp_path / "none")}
    run = subprocess.run(["bash", str(SCRIPT)], env=env, check=False, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 1
    assert run.stderr.strip() == (
        f"gpu-check: no wheels in {tmp_path / 'none'}; run 'make gpu-wheels' here first and carry "
        f"{tmp_path / 'none'}."
    )
    assert not (tmp_path / "gpu_check.json").exists()
