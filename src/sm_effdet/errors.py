"""Errors the job reports to the user, and the failure file SageMaker shows."""

from __future__ import annotations

import os
from pathlib import Path

# SageMaker shows the first 1024 characters of output/failure as the job's FailureReason.
FAILURE_REASON_LIMIT = 1024


class JobError(Exception):
    """A failure whose message is a complete sentence for the user: what is wrong, what to do."""


class UserInputError(JobError):
    """Bad hyperparameters, data or configuration: the user can fix it."""

    exit_code = 2


def write_failure(path: Path, reason: str, details: str = "") -> None:
    """Write the failure file: the one-sentence reason first, optional details after."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = reason.strip()
    if details:
        text += "\n\n" + details.strip()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)


class JobStopped(JobError):
    """The job was stopped by a signal (StopTrainingJob, spot interruption, MaxRuntime, Ctrl-C)."""

    def __init__(self, message: str, exit_code: int = 143) -> None:
        super().__init__(message)
        self.exit_code = exit_code
