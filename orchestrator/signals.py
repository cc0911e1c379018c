"""Stops: SIGINT (Ctrl-C, `genforge cancel`) and SIGTERM (Kubernetes, Slurm, `timeout` and
every batch scheduler) both cancel a pipeline gracefully; the process exits 128 + the signal's
number (130, 143), as shells report a process the signal ended."""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# The last stop signal this process received. Ray's blocking calls turn whatever a handler
# raises into a plain KeyboardInterrupt: the number is kept here as well.
received: int | None = None


class Interrupted(KeyboardInterrupt):
    """A stop signal arrived: raised where the program was."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def raise_interrupted(signum, frame) -> None:
    global received
    received = int(signum)
    raise Interrupted(signum)


def signum_of(exc: KeyboardInterrupt) -> int:
    """The signal behind an interrupt (one Python made itself is SIGINT's)."""
    return getattr(exc, "signum", None) or received or int(signal.SIGINT)


def exit_code(exc: KeyboardInterrupt) -> int:
    """128 + the signal."""
    return 128 + signum_of(exc)


def handle(handler=raise_interrupted) -> None:
    """`handler` for both stop signals (where they arrive ignored too: a shell starts the
    background jobs of scripts with SIGINT ignored, and Python then keeps it that way)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)
