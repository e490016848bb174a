"""Ctrl-C and SIGTERM wait for the tracking write in progress, then stop the job.

A ``KeyboardInterrupt`` raised inside an MLflow SQLAlchemy session can leave a SQLite store locked by the
interrupted connection: the driver then blocks for good when it marks its runs KILLED (2 of 25 Ctrl-Cs on
a digits job hung this way). One raised while matplotlib initialises its C extension turns Ctrl-C into an
``ImportError``. So the driver's writes to the tracking store run with SIGINT (and SIGTERM) held: the first
Ctrl-C is raised as soon as the write returns; a second one during the same write raises at once (a user who means
"now" still gets it, e.g. while MLflow retries an unreachable server).

Only the main thread can own signal handlers; elsewhere (Ray Train runs the training function in a thread)
the guard does nothing.

:func:`signal_handlers_restored` exists because Ray Tune's ``Tuner.fit()`` and Train's ``TorchTrainer.fit()``
leave their own SIGINT handlers installed after they return (ray 2.60: ``tune.py: _setup_signal_catching``,
``DataParallelTrainer._register_sigint_handler``): without it, Ctrl-C during a later in-process
``kdray.distill`` would only log "ending Ray Tune run" or try to abort a finished Train run.

SIGTERM (``ray job stop``, Kubernetes, batch schedulers) is a stop on purpose, like Ctrl-C: the CLI runs in
:func:`sigterm_handled`, so it raises :class:`Terminated` (a ``KeyboardInterrupt``: every path that marks runs
KILLED on Ctrl-C does so for it too) and the CLI exits 143. Python's default would end the process at once
(runs left RUNNING), and ``ray.init`` installs its own handler (``sys.exit(signum)``: runs FAILED), so
kdray takes SIGTERM back after Ray starts (:func:`reclaim_sigterm`).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import threading

_held = threading.local()
RESUME_HINT = "Ctrl-C: Ray Train stopped the run; `--resume` continues it from its last checkpoint"
TERM_HINT = "SIGTERM: the job was stopped; `--resume` continues it from its last checkpoint"
TERM_EXIT_CODE = 128 + signal.SIGTERM  # 143, what a process ended by SIGTERM reports
_sigterm = {"wanted": False, "received": False}  # the CLI asked for SIGTERM handling; one came


class Terminated(KeyboardInterrupt):
    """SIGTERM received: an interruption (runs KILLED, resumable), told apart from Ctrl-C by its type."""


def _raise_terminated(signum, frame):
    _sigterm["received"] = True
    raise Terminated(TERM_HINT)


def as_received(err: BaseException) -> BaseException:
    """``err``, or :class:`Terminated` for a plain ``KeyboardInterrupt`` that SIGTERM caused: Ray's blocking
    calls (``ray.wait``, ``ray.get``) replace whatever a signal handler raised by a ``KeyboardInterrupt``."""
    if type(err) is KeyboardInterrupt and _sigterm.get("received"):
        return Terminated(TERM_HINT)
    return err


@contextlib.contextmanager
def sigterm_handled():
    """In the block SIGTERM raises :class:`Terminated` in the main thread (the CLI runs its commands so)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous, wanted = signal.signal(signal.SIGTERM, _raise_terminated), _sigterm["wanted"]
    _sigterm.update(wanted=True, received=False)
    try:
        yield
    finally:
        _sigterm["wanted"] = wanted
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def reclaim_sigterm() -> None:
    """Put kdray's SIGTERM handler back where :func:`sigterm_handled` asked for it and something (``ray.init``
    sets ``sys.exit(signum)``) replaced it; nothing otherwise, so a library caller keeps its own."""
    if _sigterm["wanted"] and threading.current_thread() is threading.main_thread():
        if signal.getsignal(signal.SIGTERM) is not _raise_terminated:
            signal.signal(signal.SIGTERM, _raise_terminated)


@contextlib.contextmanager
def sigterm_forwarded(target: int):
    """In the block, when the CLI handles SIGTERM, the first SIGTERM goes to the handler of ``target`` (Tune
    stops a run gracefully on SIGUSR1 as on Ctrl-C) and is recorded in the yielded list; a second one, or
    one arriving before such a handler exists, raises :class:`Terminated` at once."""
    seen: list[int] = []
    if not _sigterm["wanted"] or threading.current_thread() is not threading.main_thread():
        yield seen
        return

    def forward(signum, frame):
        handler = signal.getsignal(target)
        seen.append(signum)
        if len(seen) > 1 or not callable(handler):
            _raise_terminated(signum, frame)
        handler(target, frame)

    signal.signal(signal.SIGTERM, forward)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGTERM, _raise_terminated)


def interruption(seen: list[int], message: str) -> KeyboardInterrupt:
    """The exception for a stop by the signals in ``seen``: :class:`Terminated` if SIGTERM was among them."""
    return Terminated(message.replace("Ctrl-C", "SIGTERM", 1)) if signal.SIGTERM in seen else KeyboardInterrupt(message)


HELD = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def sigint_held():
    """Run the block with Ctrl-C and SIGTERM deferred to its end (nested blocks defer to the outermost one)."""
    if threading.current_thread() is not threading.main_thread() or getattr(_held, "active", False):
        yield
        return
    received: list[int] = []
    previous = {s: signal.getsignal(s) for s in HELD}

    def hold(signum, frame):
        if received:  # the second signal: stop now
            if signal.SIGTERM in (signum, *received):
                _raise_terminated(signum, frame)
            raise KeyboardInterrupt
        received.append(signum)

    for s in HELD:
        if previous[s] is not signal.SIG_IGN and previous[s] is not None:  # an ignored signal stays ignored
            signal.signal(s, hold)
    _held.active = True
    try:
        yield
    finally:
        _held.active = False
        for s, handler in previous.items():
            if handler is not None:  # None: installed outside Python, cannot be put back
                signal.signal(s, handler)
        if received:
            _deliver(received[0], previous[received[0]])


def _deliver(signum: int, handler) -> None:
    """Hand the held signal to the handler that was installed before (Python's SIGINT one raises
    KeyboardInterrupt, kdray's SIGTERM one :class:`Terminated`)."""
    if callable(handler):
        handler(signum, None)
    elif handler == signal.SIG_DFL:
        os.kill(os.getpid(), signum)


def holds_sigint(method):
    """Decorator form of :func:`sigint_held` (SIGTERM held too), for methods that write to the tracking store."""
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


_RESTORED = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if s is not None)


def fit_as_interruptible(trainer):
    """``trainer.fit()`` for a Ray Train trainer, where Ctrl-C ends as ``KeyboardInterrupt`` (SIGTERM as
    :class:`Terminated`).

    Train V2 (ray 2.60) answers Ctrl-C by aborting the run gracefully (workers stopped, checkpoints kept),
    after which its ``ray.get`` raises ``SystemExit(1)``: a job stopped on purpose would read as a crash
    (runs FAILED with "SystemExit: 1", exit code 1, no word on resuming). The handler Train installs
    (``_register_sigint_handler``, called inside ``fit``) is wrapped to remember the Ctrl-C, so the job
    is marked KILLED and the CLI exits 130 instead. Train's handler is left in charge of the abort. Train
    installs nothing for SIGTERM (``ray.init``'s ``sys.exit`` would leave the workers running and the runs
    FAILED): when the CLI handles SIGTERM, it is routed to the same graceful abort.
    """
    seen: list[int] = []
    register = getattr(trainer, "_register_sigint_handler", None)
    reclaim_sigterm()
    if register is not None:
        def register_and_watch(controller):
            register(controller)
            train_handler = signal.getsignal(signal.SIGINT)

            def watch(signum, frame):
                seen.append(signum)
                if signum == signal.SIGINT:
                    return train_handler(signum, frame)
                quiet = logging.getLogger(train_handler.__module__)  # its "Received SIGINT" would be wrong
                level = quiet.level
                quiet.setLevel(logging.WARNING)
                try:
                    train_handler(signal.SIGINT, frame)
                finally:
                    quiet.setLevel(level)

            signal.signal(signal.SIGINT, watch)
            if _sigterm["wanted"]:
                signal.signal(signal.SIGTERM, watch)

        trainer._register_sigint_handler = register_and_watch
    with signal_handlers_restored(*_RESTORED):  # Train's handler would outlive fit() (see the module docstring)
        try:
            result = trainer.fit()
        except SystemExit:
            if seen:
                raise interruption(seen, RESUME_HINT) from None
            raise
    if seen:
        raise interruption(seen, RESUME_HINT)
    return result
