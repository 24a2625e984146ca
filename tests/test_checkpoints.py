"""Checkpoint files: atomic writes under SIGKILL, corrupt ones skipped, unfit ones refused."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import time

import pytest
import torch

from sm_effdet.errors import UserInputError
from sm_effdet.training.checkpoints import (
    META_KEY,
    checkpoint_name,
    find_resumable,
    list_checkpoints,
)

META = {"backbone": "tf_lite0", "img_size": 256, "classes": [[3, "rectangle"], [7, "ellipse"]]}


def payload(step: int, meta: dict = META, size: int = 1) -> bytes:
    buffer = io.BytesIO()
    torch.save({"epoch": 0, "global_step": step, META_KEY: meta, "w": torch.zeros(size)}, buffer)
    return buffer.getvalue()


def test_newest_readable_checkpoint_wins_and_a_corrupt_one_is_skipped(tmp_path):
    (tmp_path / checkpoint_name("algo-1", 0, 10)).write_bytes(payload(10))
    newest = tmp_path / checkpoint_name("algo-1", 1, 20)
    newest.write_bytes(payload(20)[:100])  # cut short, as by a crash without atomic writes
    (tmp_path / "unrelated.ckpt").write_bytes(b"x")
    path, info = find_resumable(tmp_path, META)
    assert path.name == checkpoint_name("algo-1", 0, 10) and info["step"] == 10
    assert find_resumable(tmp_path / "absent", META) is None


def test_checkpoint_for_another_model_is_refused(tmp_path):
    (tmp_path / checkpoint_name("algo-1", 0, 5)).write_bytes(payload(5, {**META, "backbone": "tf_d0"}))
    with pytest.raises(UserInputError, match="was made for backbone 'tf_d0' but this job has 'tf_lite0'"):
        find_resumable(tmp_path, META)
    other_classes = {**META, "classes": [[1, "cat"]]}
    with pytest.raises(UserInputError, match="was made for classes"):
        find_resumable(tmp_path, {**other_classes, "backbone": "tf_d0"})


def test_a_checkpoint_from_before_a_hyperparameter_existed_resumes_with_its_old_behaviour(tmp_path):
    """A checkpoint recorded before `recipe` and the batch-norm keys existed: the job's record
    (as _fit_meta writes it: ema_decay auto resolved) matches when it trains as that job did, and
    a job that would train otherwise is refused, naming the value to restore."""
    from sm_effdet.hyperparameters import parse_hyperparameters

    def record(**values):
        hp = parse_hyperparameters({"bn_momentum": "0.01", "batch_size": "8", **values})
        return hp.to_dict() | {"ema_decay": hp.moving_average_decay()}

    old = {k: v for k, v in record().items() if k not in ("recipe", "bn_momentum", "bn_stats_images")}
    (tmp_path / checkpoint_name("algo-1", 0, 5)).write_bytes(payload(5, {**META, "hyperparameters": old}))
    assert find_resumable(tmp_path, {**META, "hyperparameters": record()})[1]["step"] == 5
    with pytest.raises(UserInputError, match=r"hyperparameters: ema_decay 0\.0 \(now 0\.9998\); recipe 'short' "
                       r"\(now 'long'\); to resume, restore those values"):
        find_resumable(tmp_path, {**META, "hyperparameters": record(recipe="long")})


def test_names_carry_the_host_and_sort_by_step(tmp_path):
    names = [checkpoint_name("algo-2", 0, 7), checkpoint_name("algo-1", 1, 30), checkpoint_name("10.0.0.1", 0, 3)]
    for i, name in enumerate(names):
        (tmp_path / name).write_bytes(payload(i))
    assert len(set(names)) == 3 and "algo-2" in names[0]
    assert [p.name for p in list_checkpoints(tmp_path)] == [names[1], names[0], names[2]]


WRITER = """
import io, sys, torch
from pathlib import Path
from sm_effdet.model.artifacts import atomic_write_bytes
from sm_effdet.training.checkpoints import META_KEY, checkpoint_name
folder = Path(sys.argv[1])
meta = {"backbone": "tf_lite0", "img_size": 256, "classes": [[3, "rectangle"], [7, "ellipse"]]}
step = 0
print("ready", flush=True)
while True:
    step += 1
    buffer = io.BytesIO()
    torch.save({"epoch": 0, "global_step": step, META_KEY: meta, "w": torch.randn(2_000_000)}, buffer)
    atomic_write_bytes(folder / checkpoint_name("algo-1", 0, step % 3), buffer.getvalue())
"""


def test_sigkill_during_writes_never_leaves_a_corrupt_checkpoint(tmp_path):
    for attempt in range(2):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        assert writer.stdout.readline().strip() == "ready"
        time.sleep(0.7 + 0.37 * attempt)
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        files = list_checkpoints(tmp_path)
        assert files, "the writer wrote nothing before it was killed"
        for path in files:  # every file under a checkpoint name is whole
            checkpoint = torch.load(path, weights_only=True)
            assert checkpoint["w"].numel() == 2_000_000
        assert find_resumable(tmp_path, META) is not None
