"""``OptunaSearch`` that survives a driver killed while Tune saved its state.

Tune writes the experiment state and then the searcher's state; a driver killed between the two leaves
a trial that the restored searcher never suggested. Stock ``OptunaSearch`` then raises ``KeyError`` on
that trial's first result and the resumed sweep dies. Here such a trial is simply not told to Optuna
(the sampler misses one observation; the trial itself runs and is tracked as usual).
"""
from __future__ import annotations

import logging

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
