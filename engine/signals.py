"""How a run stops on a signal, in one place: SIGINT (Ctrl-C), SIGTERM (what SLURM and Kubernetes send before a
kill) and SIGHUP (a closed terminal or ssh session) stop a run where it is, as an :class:`Interrupted`
exception; a closed output pipe (``... | head``) stops it as a BrokenPipeError. While a checkpoint and its
record are written (:func:`signals_held`) the signals wait, so that the two happen together or not at all.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Optional

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal: SIGINT, SIGTERM, SIGHUP or SIGPIPE (a closed output pipe); ``message`` is the
    line for the user."""

    def __init__(self, signal_name: str = "SIGINT", message: str = ""):
        super().__init__(message or signal_name)
        self.signal_name, self.message = signal_name, message


def raise_interrupted(signum, frame):
    """The handler :func:`stop_on_signals` installs: the first stop signal stops the run where it is; the next
    ones are ignored while the run records how it stopped (a second Ctrl-C cannot cut that short)."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    raise Interrupted(signal.Signals(signum).name)


@contextlib.contextmanager
def stop_on_signals():
    """SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` inside the block; a signal the shell ignores
    (``nohup``: SIGHUP) stays ignored. Afterwards the handlers found are back, except after a stop, when the
    next signals stay ignored until the process ends."""
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(s, raise_interrupted)
    try:
        yield
    finally:
        for s, handler in previous.items():
            if signal.getsignal(s) is not signal.SIG_IGN:
                signal.signal(s, handler)


def stop_signal(error: BaseException) -> Optional[str]:
    """The signal that stopped a run, by the exception it raised: an interrupt (SIGINT, SIGTERM, SIGHUP), or a
    closed output pipe (``... | head``: SIGPIPE); None for an error."""
    if isinstance(error, BrokenPipeError):
        return "SIGPIPE"
    return getattr(error, "signal_name", "SIGINT") if isinstance(error, KeyboardInterrupt) else None


@contextlib.contextmanager
def signals_held():
    """SIGINT, SIGTERM and SIGHUP wait until the block ends, then arrive as usual: a checkpoint write and the record
    of what it holds happen together or not at all. (The handlers are swapped for a recorder: blocking the
    signals would not do, since any other thread, TensorBoard's writer for one, can take them.) Main thread
    only, as Python's handlers; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if pending:                                   # delivered now, to the handler it was meant for
        signal.raise_signal(pending[0])
