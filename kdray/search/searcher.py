"""``OptunaSearch`` that survives a driver killed while Tune saved its state.

Tune writes the experiment state and then the searcher's state; a driver killed between the two leaves
a trial that the restored searcher never suggested. Stock ``OptunaSearch`` then raises ``KeyError`` on
that trial's first result and the resumed sweep dies. Here such a trial is simply not told to Optuna
(the sampler misses one observation; the trial itself runs and is tracked as usual).
"""
from __future__ import annotations

import logging
import threading

import optuna
from ray.tune.search.optuna import OptunaSearch

logger = logging.getLogger(__name__)


class ResumableOptunaSearch(OptunaSearch):
    def _known(self, trial_id: str) -> bool:
        if trial_id in self._ot_trials:
            return True
        logger.info("trial %s is unknown to the restored searcher; its result is not told to Optuna", trial_id)
        return False

    def on_trial_result(self, trial_id: str, result: dict):
        if self._known(trial_id):
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if self._known(trial_id):
            super().on_trial_complete(trial_id, result, error)



class PicklableNSGAIISampler(optuna.samplers.NSGAIISampler):
    """NSGA-II that Tune can pickle. Optuna 5.1's genetic samplers hold a ``threading.Lock``
    (``BaseGASampler._thread_lock``), so ``tune.Tuner`` failed to save its experiment state ("cannot pickle
    '_thread.lock' object") and no NSGA-II sweep started; the lock is left out of the pickled state and a new one
    made on unpickling (a lock guards one process's threads: nothing of it is worth carrying)."""

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_thread_lock", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._thread_lock = threading.Lock()
