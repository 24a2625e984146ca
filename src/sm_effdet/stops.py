"""The one owner of SIGTERM and SIGINT for the whole life of the job's process.

SageMaker stops a job (StopTrainingJob, MaxRuntime, spot interruption) with SIGTERM and kills it
120 seconds later; Ctrl-C sends SIGINT. What a stop does depends on the phase the job is in:

- "start-up" (reading data, loading a checkpoint, building the model, Lightning's set-up and
  restore): raise `JobStopped` at once. It is a BaseException, so start-up code that catches
  `Exception` (image headers, unreadable checkpoints) cannot swallow it.
- "training": only record it. Lightning finishes the step in progress, the checkpoint callback
  writes a checkpoint and the job exits 143 (130 for SIGINT).
- "finishing" (writing the model, writing a failure): only record it, so that the model is
  written whole (or the failure reason is written) before the process exits.

A repeated signal is logged and otherwise ignored: there is one stop per process.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable

from .errors import JobStopped

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT (Ctrl-C)"}
# Test-only: SM_EFFDET_TEST_PAUSE=<phase>[,<phase>...] makes the job log "test pause at <phase>"
# and wait there (once, up to a minute) until a signal arrives, so that tests signal a phase
# without guessing times.
TEST_PAUSE = frozenset(filter(None, os.environ.get("SM_EFFDET_TEST_PAUSE", "").split(",")))

_paused: set[str] = set()
_state = {
    "pid": 0,
    "phase": "start-up",
    "doing": "starting",
    "signum": 0,
    "count": 0,
    "on_training_stop": None,
}


def install() -> None:
    """Own SIGTERM and SIGINT from now on; forked children (loader workers) get the defaults."""
    _state["pid"] = os.getpid()
    for signum in SIGNALS:
        signal.signal(signum, _on_signal)
    os.register_at_fork(after_in_child=_defaults_in_child)


def _defaults_in_child() -> None:
    # A data loader worker is stopped by its parent; it must not act as the job.
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    except ValueError:  # forked from a thread other than the main one
        pass


def start_up(doing: str) -> None:
    """Name what start-up is doing now; it appears in the reason when a stop lands here."""
    _state["phase"], _state["doing"] = "start-up", doing
    check()


def training(on_stop: Callable[[], None]) -> None:
    """Training began: from now on a stop is handed to Lightning through `on_stop`."""
    _state["phase"], _state["on_training_stop"] = "training", on_stop
    if _state["signum"]:
        on_stop()


def finishing() -> None:
    """From now on a stop is only recorded: what is being written is finished first."""
    _state["phase"] = "finishing"


def requested() -> int:
    """The signal that asked the job to stop, or 0."""
    return _state["signum"]


def exit_code() -> int:
    return 128 + _state["signum"]


def check() -> None:
    """Raise JobStopped if a stop arrived (for phase boundaries where one may have been recorded)."""
    if _state["signum"]:
        raise stopped_before_training()


def stopped_before_training() -> JobStopped:
    by = NAMES.get(_state["signum"], f"signal {_state['signum']}")
    return JobStopped(
        f"the job was stopped by {by} before training began (while {_state['doing']}); nothing "
        "was trained and no model was written.",
        exit_code=exit_code(),
    )


def _on_signal(signum: int, frame: object) -> None:
    if os.getpid() != _state["pid"]:
        return
    _state["count"] += 1
    if _state["signum"]:
        log.warning("%s received again; the job is already stopping", NAMES.get(signum, signum))
        return
    _state["signum"] = signum
    log.warning("%s received while %s: stopping", NAMES.get(signum, signum),
                _state["doing"] if _state["phase"] == "start-up" else _state["phase"])
    if _state["phase"] == "start-up":
        raise stopped_before_training()
    if _state["phase"] == "training" and _state["on_training_stop"] is not None:
        _state["on_training_stop"]()


def pause_for_test(phase: str) -> None:
    """Test-only hook (see TEST_PAUSE): wait here for the next signal, at most a minute."""
    if phase not in TEST_PAUSE or phase in _paused:
        return
    _paused.add(phase)
    count = _state["count"]
    log.info("test pause at %s", phase)
    deadline = time.monotonic() + 60
    while _state["count"] == count and time.monotonic() < deadline:
        time.sleep(0.05)
    # In start-up the handler has raised already; elsewhere the phase goes on as it would.
