"""The `sm-effdet` command."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("sm-effdet: not built yet", file=sys.stderr)
    return 2
