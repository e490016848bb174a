"""What every kdray search does around its Tune experiment, in one place for ``kdray.sweep`` and
``kdray.block_search``: open the search's MLflow parent run (:func:`open_tracking`) and run
``tuner.fit()`` so that an interruption is an interruption (:func:`fit_tuner`).

Kept apart from the searches themselves because both must behave the same way on Ctrl-C, SIGTERM and
``--resume``: a fix to one (the interrupt handling, the state-saving period) is then a fix to both.
"""
from __future__ import annotations

import os
import signal

from kdray.orchestrator.interrupts import interruption, reclaim_sigterm, sigterm_forwarded, signal_handlers_restored
from kdray.search.tracking import write_state

CHECKPOINT_PERIOD_KEY = "TUNE_GLOBAL_CHECKPOINT_S"


def fit_tuner(tuner, total: int, stopped: str):
    """``tuner.fit()`` with the experiment state saved every second (Tune's default period is adaptive,
    >= 10 s): a killed driver loses at most the trials it started in its last second.

    Tune answers Ctrl-C by stopping the trials, saving its state and *returning* the partial results; read
    as a finished search they would be ranked and logged. Fewer than ``total`` trials ended (terminated or
    errored) means the search was stopped: it raises ``KeyboardInterrupt`` with ``stopped`` (formatted with
    ``ended`` and ``total``), so the search run is marked KILLED and ``--resume`` continues it. SIGTERM takes
    the same way (Tune's SIGUSR1 stop) and raises ``Terminated``."""
    previous = os.environ.get(CHECKPOINT_PERIOD_KEY)
    os.environ[CHECKPOINT_PERIOD_KEY] = previous or "1"
    reclaim_sigterm()  # ray.init replaced it
    try:
        with signal_handlers_restored(), sigterm_forwarded(signal.SIGUSR1) as terms:  # Tune leaves its Ctrl-C
            results = tuner.fit()                                     # handler behind (see interrupts.py)
    finally:
        if previous is None:
            os.environ.pop(CHECKPOINT_PERIOD_KEY, None)
    ended = results.num_terminated + results.num_errors
    if ended < total:
        raise interruption(terms, stopped.format(ended=ended, total=total))
    return results


def open_tracking(base, sweep_dir: str, name: str, state: dict, state_path: str, params: dict[str, str],
                  texts: dict[str, str], resume: bool, log, what: str = "sweep"):
    """The search's MLflow store and parent run: ``(uri, tracking)``, both ``None`` when ``base`` tracks
    nothing. Fails before any training when an HTTP store does not answer; reopens the parent saved in
    ``state`` (or, resuming, the RUNNING one left for ``sweep_dir``) and records its id in ``state_path``
    at once, so a driver killed from here on never gets a second parent."""
    from kdray.orchestrator.tracking import check_reachable, tracking_uri_for
    from kdray.search.tracking import SweepTracking

    uri = tracking_uri_for(base)
    if not uri:
        return None, None
    check_reachable(uri)
    tracking = SweepTracking(uri, base.mlflow.experiment, sweep_dir, name)
    tracking.start(state.get("parent_run_id"), params, texts, resume)
    state.update(parent_run_id=tracking.parent_id, tracking_uri=uri, name=name)
    write_state(state_path, state)
    log(f"MLflow: {uri}  ({what} run {tracking.parent_id})")
    return uri, tracking
