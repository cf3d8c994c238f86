"""``python -m l2e_optim``: the ``demo`` and ``analyze`` commands (see docs/demo.md)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ._lab.cli import main as _cli_main


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    return _cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
