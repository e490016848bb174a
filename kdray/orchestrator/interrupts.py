"""Ctrl-C waits for the tracking write in progress, then stops the job.

A ``KeyboardInterrupt`` raised inside an MLflow SQLAlchemy session can leave a SQLite store locked by the
interrupted connection: the driver then blocks for good when it marks its runs KILLED (2 of 25 Ctrl-Cs on
a digits job hung this way). One raised while matplotlib initialises its C extension turns Ctrl-C into an
``ImportError``. So the driver's writes to the tracking store run with SIGINT held: the first Ctrl-C is
raised as soon as the write returns; a second one during the same write raises at once (a user who means
"now" still gets it, e.g. while MLflow retries an unreachable server).

Only the main thread can own signal handlers; elsewhere (Ray Train runs the training function in a thread)
the guard does nothing.

:func:`signal_handlers_restored` exists because Ray Tune's ``Tuner.fit()`` and Train's ``TorchTrainer.fit()``
leave their own SIGINT handlers installed after they return (ray 2.60: ``tune.py: _setup_signal_catching``,
``DataParallelTrainer._register_sigint_handler``): without it, Ctrl-C during a later in-process
``kdray.distill`` would only log "ending Ray Tune run" or try to abort a finished Train run.
"""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading

_held = threading.local()
RESUME_HINT = "Ctrl-C: Ray Train stopped the run; `--resume` continues it from its last checkpoint"


@contextlib.contextmanager
def sigint_held():
    """Run the block with Ctrl-C deferred to its end (nested blocks defer to the outermost one)."""
    if threading.current_thread() is not threading.main_thread() or getattr(_held, "active", False):
        yield
        return
    received: list[int] = []

    def hold(signum, frame):
        if received:  # the second Ctrl-C: stop now
            raise KeyboardInterrupt
        received.append(signum)

    previous = signal.signal(signal.SIGINT, hold)
    _held.active = True
    try:
        yield
    finally:
        _held.active = False
        signal.signal(signal.SIGINT, previous)
        if received:
            _deliver(previous)


def _deliver(handler) -> None:
    """Hand the held Ctrl-C to the handler that was installed before (Python's raises KeyboardInterrupt)."""
    if callable(handler):
        handler(signal.SIGINT, None)
    elif handler == signal.SIG_DFL:
        os.kill(os.getpid(), signal.SIGINT)


def holds_sigint(method):
    """Decorator form of :func:`sigint_held`, for methods that write to the tracking store."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with sigint_held():
            return method(*args, **kwargs)
    return wrapper


@contextlib.contextmanager
def signal_handlers_restored(*signals: int):
    """Put back the handlers of ``signals`` (default: SIGINT, SIGUSR1) that were installed before the block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = signals or tuple(s for s in (signal.SIGINT, getattr(signal, "SIGUSR1", None)) if s is not None)
    before = {s: signal.getsignal(s) for s in signals}
    try:
        yield
    finally:
        for s, handler in before.items():
            if handler is not None:  # None: installed outside Python, cannot be put back
                signal.signal(s, handler)


def fit_as_interruptible(trainer):
    """``trainer.fit()`` for a Ray Train trainer, where Ctrl-C ends as ``KeyboardInterrupt``.

    Train V2 (ray 2.60) answers Ctrl-C by aborting the run gracefully (workers stopped, checkpoints kept),
    after which its ``ray.get`` raises ``SystemExit(1)``: a job stopped on purpose would read as a crash
    (runs FAILED with "SystemExit: 1", exit code 1, no word on resuming). The handler Train installs
    (``_register_sigint_handler``, called inside ``fit``) is wrapped to remember the Ctrl-C, so the job
    is marked KILLED and the CLI exits 130 instead. Train's handler is left in charge of the abort.
    """
    seen: list[int] = []
    register = getattr(trainer, "_register_sigint_handler", None)
    if register is not None:
        def register_and_watch(controller):
            register(controller)
            train_handler = signal.getsignal(signal.SIGINT)

            def watch(signum, frame):
                seen.append(signum)
                train_handler(signum, frame)

            signal.signal(signal.SIGINT, watch)

        trainer._register_sigint_handler = register_and_watch
    with signal_handlers_restored():  # Train's handler would outlive fit() (see the module docstring)
        try:
            result = trainer.fit()
        except SystemExit:
            if seen:
                raise KeyboardInterrupt(RESUME_HINT) from None
            raise
    if seen:
        raise KeyboardInterrupt(RESUME_HINT)
    return result
