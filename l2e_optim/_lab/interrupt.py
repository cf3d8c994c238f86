"""Ctrl-C for training loops: the first one stops at the next step boundary, a second one at once.

Stopping between steps keeps the model, optimizer and L2E statistics consistent, so the
checkpoint written on the way out is one a resume can trust. A KeyboardInterrupt that lands
mid-step (a second Ctrl-C) leaves that step half done; its state is not saved.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType, TracebackType
from typing import Any


class StopRequested(KeyboardInterrupt):
    """Raised at a step boundary after Ctrl-C: the training state is consistent."""


class StepBoundaryInterrupt:
    """Context manager: while active, SIGINT sets :attr:`requested` (twice: raises at once)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> StepBoundaryInterrupt:
        if threading.current_thread() is threading.main_thread():  # signals only work there
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (Ctrl-C again to stop at once)", file=sys.stderr)

    def check(self) -> None:
        """Call between steps: raises :class:`StopRequested` once Ctrl-C was pressed."""
        if self.requested:
            raise StopRequested
