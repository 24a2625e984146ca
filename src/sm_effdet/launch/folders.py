"""Local folders a command will write into, checked before any work starts.

`fetch` and `--local` write where the user says (or into ./sm-effdet-output); a path that is a
file, or below one, or not writable would otherwise fail only after the download or the whole
training run, with a traceback instead of where the model went.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserInputError


def check_output_folder(path: Path, what: str) -> None:
    """`path` is a folder this user can write into, or one that can be created."""
    path = Path(path)
    if os.path.lexists(path) and not path.is_dir():
        kind = "a broken link" if path.is_symlink() and not path.exists() else "a file"
        raise UserInputError(
            f"{what} {path} is {kind}, not a folder; give a folder (it is created when missing) "
            "or move it away."
        )
    existing = path.absolute()
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        raise UserInputError(
            f"{what} {path} cannot be created because {existing} is a file; give a folder "
            "elsewhere or move that file away."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserInputError(
            f"{what} {path} cannot be written: {existing} is not writable by this user; give a "
            "folder you can write to."
        )
