"""Errors the job reports to the user, and the failure file SageMaker shows."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

# SageMaker shows the first 1024 characters of output/failure as the job's FailureReason.
FAILURE_REASON_LIMIT = 1024


class JobError(Exception):
    """A failure whose message is a complete sentence for the user: what is wrong, what to do."""


class UserInputError(JobError):
    """Bad hyperparameters, data or configuration: the user can fix it."""

    exit_code = 2


def shorten(value: Any, limit: int = 80) -> str:
    """`value` as text, cut in the middle when longer than `limit`, so that a quoted value
    cannot push a message's advice out of the 1024 characters SageMaker shows."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return text
    marker = f"...({len(text)} characters)..."
    keep = max(limit - len(marker), 2)
    return text[: keep - keep // 2] + marker + text[len(text) - keep // 2 :]


def bounded_reason(reason: str, limit: int = FAILURE_REASON_LIMIT) -> str:
    """The reason within `limit` characters: a too-long one loses its middle, never its start
    (what went wrong) nor its end (what to do)."""
    reason = reason.strip()
    if len(reason) <= limit:
        return reason
    marker = " [...] "
    head = (limit - len(marker)) * 2 // 3
    tail = limit - len(marker) - head
    return reason[:head] + marker + reason[len(reason) - tail :]


def write_failure(path: Path, reason: str) -> None:
    """Write the failure file, the reason first; the first process of a node to fail wins."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return
    except OSError as exc:
        # An output/ the job cannot write: the reason still reaches the log.
        print(f"cannot write the failure file {path}: {exc}", file=sys.stderr)
        return
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(bounded_reason(reason) + "\n")


def failure_reason(exc: BaseException, hp: Any = None) -> tuple[str, int]:
    """The one sentence the user sees as the job's FailureReason, and the exit code."""
    if isinstance(exc, (JobError, JobStopped)):
        return str(exc), getattr(exc, "exit_code", 1)
    name = type(exc).__name__
    if name == "OutOfMemoryError" or "CUDA out of memory" in str(exc):
        sizes = f" at batch_size={hp.batch_size} and img_size={hp.img_size}" if hp else ""
        return (
            f"the GPU ran out of memory{sizes}; lower batch_size or img_size, or use an "
            "instance type with more GPU memory.",
            1,
        )
    if isinstance(exc, KeyboardInterrupt):
        return "training was interrupted before it finished.", 130
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return (
        f"training failed with an unexpected {name}: {first}; the traceback is in the job's log.",
        1,
    )


class JobStopped(BaseException):
    """The job was stopped by a signal (StopTrainingJob, spot interruption, MaxRuntime, Ctrl-C).

    Not an Exception, like KeyboardInterrupt: code that catches Exception to skip a bad image or
    an unreadable checkpoint must not swallow a stop. Its message is a sentence for the user.
    """

    def __init__(self, message: str, exit_code: int = 143) -> None:
        super().__init__(message)
        self.exit_code = exit_code
