"""Stops at every phase of a job's life, resume rules, and divergence: real ./train, real signals.

Signals are synchronised on the job's own log: SM_EFFDET_TEST_PAUSE=<phase> makes the job log
"test pause at <phase>" and wait there for the next signal (sm_effdet.stops.pause_for_test).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess

import pytest
import torch
from conftest import FAST, failure_text, model_files, run_train, start_train, write_tree

from sm_effdet.model import artifacts
from sm_effdet.model.artifacts import non_finite_tensors, strict_json
from sm_effdet.training.checkpoints import list_checkpoints

MODEL = sorted(artifacts.MODEL_FILES)


def read_until(process: subprocess.Popen, pattern: str, timeout: float = 300) -> list[str]:
    # readline blocks; the job's own pause hook guarantees the line comes (or the job ends).
    lines = []
    for line in iter(process.stdout.readline, ""):
        lines.append(line)
        if re.search(pattern, line):
            return lines
    raise AssertionError(f"never saw {pattern!r}:\n{''.join(lines[-30:])}")


def stop_at(base, phase: str, signum: int = signal.SIGTERM):
    """Start ./train, send `signum` when it pauses at `phase`; the exit code and the whole log."""
    job = start_train(base, SM_EFFDET_TEST_PAUSE=phase)
    log = read_until(job, rf"test pause at {phase}")
    job.send_signal(signum)
    rest, _ = job.communicate(timeout=300)
    return job.returncode, "".join(log) + rest


def strict_load(path):
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def annotations(base):
    return json.loads((base / "input" / "data" / "training" / "annotations.json").read_text())


# -- before training ----------------------------------------------------------------------------


@pytest.mark.parametrize("signum, code, name", [
    (signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, r"SIGINT \(Ctrl-C\)"),
])
def test_stop_while_image_headers_are_read_is_not_swallowed(tmp_path, signum, code, name):
    base = write_tree(tmp_path / "opt_ml", {**FAST, "val_fraction": "0"}, n_images=6)
    coco = annotations(base)
    for entry in coco["images"]:  # sizes must be read from the files' headers
        del entry["width"], entry["height"]
    (base / "input" / "data" / "training" / "annotations.json").write_text(json.dumps(coco))

    returncode, log = stop_at(base, "image-header", signum)
    assert returncode == code, log[-3000:]
    reason = failure_text(base)
    assert re.fullmatch(
        rf"the job was stopped by {name} before training began \(while reading the data\); "
        r"nothing was trained and no model was written\.\n", reason
    ), reason
    assert "training tf_lite0" not in log and "Traceback" not in log
    assert model_files(base) == []


# -- a finished one-epoch job: stopped while its model was written, then resumed ---------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One epoch, SIGTERM while the model files are being written (between weights and JSON)."""
    base = write_tree(
        tmp_path_factory.mktemp("finished") / "opt_ml",
        {**FAST, "val_fraction": "0", "batch_size": "4"}, n_images=8,
    )
    returncode, log = stop_at(base, "model-writing")
    return base, returncode, log


def copy_of(finished, tmp_path, **hyperparameters):
    base = tmp_path / "opt_ml"
    shutil.copytree(finished[0], base)
    (base / "output" / "failure").unlink(missing_ok=True)
    hp_file = base / "input" / "config" / "hyperparameters.json"
    hp_file.write_text(json.dumps({**json.loads(hp_file.read_text()), **hyperparameters}))
    return base


def test_stop_while_the_model_is_written_finishes_it_whole(finished):
    base, returncode, log = finished
    assert returncode == 0, log[-3000:]
    assert "SIGTERM received while finishing: stopping" in log
    assert "the stop arrived after training had ended; the model was written whole" in log
    assert model_files(base) == MODEL
    assert not (base / "output" / "failure").exists()
    assert [p.name for p in (base / "model").iterdir() if p.name.startswith(".")] == []
    meta = strict_load(base / "model" / "model.json")
    assert meta["history"][0]["epoch"] == 1
    assert meta["hyperparameters"]["epochs"] == 1


def test_stop_while_a_checkpoint_is_loaded_for_resume(finished, tmp_path):
    base = copy_of(finished, tmp_path, epochs=2)
    returncode, log = stop_at(base, "checkpoint-load")
    assert returncode == 143, log[-3000:]
    assert "cannot be read" not in log and "resuming from" not in log
    reason = failure_text(base)
    assert reason.startswith(
        "the job was stopped by SIGTERM before training began (while looking for a checkpoint "
        "to resume)"
    ), reason
    assert model_files(base) == []
    assert len(list_checkpoints(base / "checkpoints")) == 1  # untouched, still resumable


def test_stop_while_lightning_restores_states_then_resume_finishes(finished, tmp_path):
    base = copy_of(finished, tmp_path, epochs=2)
    returncode, log = stop_at(base, "restoring", signal.SIGINT)
    assert returncode == 130, log[-3000:]
    assert "resuming from checkpoint" in log
    reason = failure_text(base)
    assert re.match(
        r"the job was stopped by SIGINT \(Ctrl-C\) before training began \(while restoring "
        r"checkpoint checkpoint-algo-1-epoch0000-step000000002\.ckpt\)", reason
    ), reason
    assert model_files(base) == []

    # num_workers may change on resume, and epochs may grow.
    (base / "output" / "failure").unlink()
    hp_file = base / "input" / "config" / "hyperparameters.json"
    hp_file.write_text(json.dumps({**json.loads(hp_file.read_text()), "num_workers": "1"}))
    result = run_train(base)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "epoch=1/2" not in result.stdout and "epoch=2/2" in result.stdout
    meta = strict_load(base / "model" / "model.json")
    assert [h["epoch"] for h in meta["history"]] == [1, 2]


def test_resume_with_other_training_hyperparameters_is_refused(finished, tmp_path):
    base = copy_of(
        finished, tmp_path, epochs="2", learning_rate="0.3", lr_schedule="constant", num_workers="1"
    )
    result = run_train(base)
    assert result.returncode == 2, result.stdout[-3000:]
    reason = failure_text(base)
    assert re.fullmatch(
        r"checkpoint checkpoint-algo-1-epoch0000-step000000002\.ckpt in \S+ was made with other "
        r"hyperparameters: learning_rate 'auto' \(now 0\.3\); lr_schedule 'cosine' \(now "
        r"'constant'\); to resume, restore those values; to start a new training run, give the "
        r"job a new checkpoint location \(CheckpointConfig\)\.\n", reason
    ), reason
    assert "num_workers" not in reason and "epochs" not in reason
    assert len(reason) <= 1024 and model_files(base) == []


# -- during training ----------------------------------------------------------------------------


def test_stop_in_validation_leaves_a_resumable_job(tmp_path):
    base = write_tree(tmp_path / "opt_ml", {**FAST, "epochs": "2", "split_file": "split.json"},
                      n_images=16)
    ids = [entry["id"] for entry in annotations(base)["images"]]
    split = {"train": ids[:4], "val": ids[4:]}
    (base / "input" / "data" / "training" / "split.json").write_text(json.dumps(split))

    returncode, log = stop_at(base, "validation")
    assert returncode == 143, log[-3000:]
    assert re.match(r"training was stopped by SIGTERM in epoch 1 at step 1; checkpoint "
                    r"checkpoint-algo-1-epoch0000-step000000001\.ckpt was written", failure_text(base))

    (base / "output" / "failure").unlink()
    result = run_train(base)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "resuming from checkpoint" in result.stdout
    # The resumed epoch 1 had no training batch left (and its validation is not repeated): it
    # ends without metrics instead of failing as unreadable data; epoch 2 trains and validates.
    assert re.search(r"epoch=1/2 ", result.stdout) and re.search(r"epoch=2/2 .*valid_map=", result.stdout)
    assert "no training image could be read" not in result.stdout
    meta = strict_load(base / "model" / "model.json")
    assert [h["epoch"] for h in meta["history"]] == [1, 2]
    assert "train_loss" in meta["history"][1]


def test_second_sigterm_right_after_the_stop_checkpoint(tmp_path):
    base = write_tree(tmp_path / "opt_ml", {**FAST, "epochs": "2", "val_fraction": "0"}, n_images=16)
    job = start_train(base, SM_EFFDET_TEST_PAUSE="training,after-stop-checkpoint")
    log = read_until(job, r"test pause at training")
    job.send_signal(signal.SIGTERM)  # during the first step: it finishes, then the checkpoint
    log += read_until(job, r"test pause at after-stop-checkpoint")
    job.send_signal(signal.SIGTERM)
    rest, _ = job.communicate(timeout=300)
    log = "".join(log) + rest
    assert job.returncode == 143, log[-3000:]
    assert "SIGTERM received again; the job is already stopping" in log
    assert log.count("checkpoint (stopped by") == 1
    reason = failure_text(base)
    assert re.fullmatch(
        r"training was stopped by SIGTERM in epoch 1 at step 1; checkpoint "
        r"checkpoint-algo-1-epoch0000-step000000001\.ckpt was written to \S+: run the job again "
        r"with the same checkpoint location to resume\.\n", reason
    ), reason
    assert model_files(base) == []
    assert len(list_checkpoints(base / "checkpoints")) == 1


# -- divergence ---------------------------------------------------------------------------------


@pytest.mark.parametrize("learning_rate", ["1e30", "1e6"])
def test_divergence_stops_the_job_and_writes_no_model(tmp_path, learning_rate):
    base = write_tree(
        tmp_path / "opt_ml",
        {**FAST, "learning_rate": learning_rate, "val_fraction": "0", "batch_size": "1", "epochs": "2"},
        n_images=12,
    )
    result = run_train(base)
    assert result.returncode == 2, result.stdout[-3000:]
    reason = failure_text(base)
    assert re.fullmatch(
        r"training diverged: the loss was not finite \(NaN or infinity\) for 10 steps in a row, "
        rf"up to epoch \d step \d+; lower learning_rate \(now {re.escape(f'{float(learning_rate):g}')}\) and use a "
        r"new checkpoint location\.\n", reason
    ), reason
    assert model_files(base) == []


def test_non_finite_weights_are_found_before_writing():
    state = {"a": torch.ones(3), "b": torch.tensor([1.0, float("nan")]), "n": torch.tensor([2])}
    assert non_finite_tensors(state) == ["b"]


def test_model_json_is_strict_json():
    text = strict_json({"metrics": {"valid_loss": float("nan"), "map": 0.5}, "h": [float("inf")]})
    assert json.loads(text) == {"metrics": {"valid_loss": None, "map": 0.5}, "h": [None]}
