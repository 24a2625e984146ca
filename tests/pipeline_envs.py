"""The light environments made from their locks as their users make them, once per test session:
the launcher's `launch` dependency group (`make train-job` runs `uv run --only-group launch`)
and the Airflow projects (pipelines/airflow: Airflow 3; pipelines/airflow2: Airflow 2.10).
uv's cache makes a second build take seconds; the first downloads Airflow (minutes)."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PIPELINES = REPO / "pipelines"
AIRFLOW_PROJECTS = {"3": PIPELINES / "airflow", "2": PIPELINES / "airflow2"}


def uv(*args: str, **env: str) -> None:
    command = [shutil.which("uv") or sys.executable, *([] if shutil.which("uv") else ["-m", "uv"])]
    subprocess.run([*command, *args], check=True, timeout=1800, cwd=REPO,
                   env={**os.environ, **env})


@functools.cache
def airflow_python(version: str) -> Path:
    """The Python of an Airflow project's environment (its .venv, as `uv sync --project` makes)."""
    project = AIRFLOW_PROJECTS[version]
    uv("sync", "--frozen", "--quiet", "--project", str(project))
    return project / ".venv" / "bin" / "python"


def launch_group_python(folder: Path) -> Path:
    """The Python of exactly the `launch` group (no project, no other group) made in `folder`."""
    uv("sync", "--frozen", "--quiet", "--only-group", "launch", UV_PROJECT_ENVIRONMENT=str(folder))
    return folder / "bin" / "python"
