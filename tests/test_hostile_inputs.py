"""Inputs a careless user or another local user could give: no code run that was not asked for, no file
written outside the job's own directory."""
from __future__ import annotations

import json
import os
import pickle

import pytest

from kdray.config import ConfigError
from kdray.search.api import is_complete_pickle, repair_tune_state

SESSION = "2026-01-02_03-04-05"
EARLIER = "2026-01-01_03-04-05"


class _Planted:
    """A pickle whose loading creates ``marker`` (what an attacker's file would do, harmlessly)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_a_pickle_is_judged_complete_or_cut_short_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    whole = pickle.dumps({"planted": _Planted(marker), "pad": b"x" * 100_000}, protocol=5)  # framed
    _write(tmp_path / "whole.pkl", whole)
    assert is_complete_pickle(str(tmp_path / "whole.pkl"))
    for cut in (len(whole) - 1, len(whole) // 2, 40, 1, 0):
        _write(tmp_path / "cut.pkl", whole[:cut])
        assert not is_complete_pickle(str(tmp_path / "cut.pkl")), cut
    _write(tmp_path / "evil.pkl", pickle.dumps(_Planted(marker)))
    assert is_complete_pickle(str(tmp_path / "evil.pkl"))
    assert not marker.exists()


def _sweep_tune_dir(tmp_path, searcher: bytes, earlier_searcher: bytes | None = None):
    """A sweep's ``tune/`` as Tune leaves it: experiment state (JSON), search-generator state (a pickle
    despite its name) and the searcher's pickle, one of each per driver session."""
    tune = tmp_path / "out" / "sw" / "tune"
    sessions = {SESSION: searcher} if earlier_searcher is None else {EARLIER: earlier_searcher, SESSION: searcher}
    for session, data in sessions.items():
        _write(tune / f"experiment_state-{session}.json", json.dumps({"trial_data": []}).encode())
        _write(tune / f"search_gen_state-{session}.json", pickle.dumps({"counter": 3}))
        _write(tune / f"searcher-state-{session}.pkl", data)
    return tune


def _plant(tmp_path, monkeypatch):
    """A complete searcher state with the right name in Ray's (world-writable) session directories,
    where kdray used to look for a 'driver's copy'."""
    marker = tmp_path / "ran"
    ray_tmp = tmp_path / "raytmp"
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    _write(ray_tmp / "ray" / "session_evil" / "artifacts" / SESSION / "tune" / "driver_artifacts" /
           f"searcher-state-{SESSION}.pkl", pickle.dumps(_Planted(marker)))
    return marker


def test_resume_with_a_state_cut_short_never_loads_a_planted_pickle(tmp_path, monkeypatch):
    marker = _plant(tmp_path, monkeypatch)
    cut = pickle.dumps({"trials": list(range(1000))})[:-20]
    tune = _sweep_tune_dir(tmp_path, cut)
    with pytest.raises(ConfigError) as err:
        repair_tune_state(str(tune), log=lambda msg: None)
    msg = str(err.value)
    assert "\n" not in msg and f"searcher-state-{SESSION}.pkl" in msg and "--resume" in msg
    assert not marker.exists()
    assert (tune / f"searcher-state-{SESSION}.pkl").read_bytes() == cut  # not replaced by the planted file


def test_a_state_cut_short_is_set_aside_for_the_sweeps_own_earlier_copy(tmp_path, monkeypatch):
    marker = _plant(tmp_path, monkeypatch)
    earlier = pickle.dumps({"trials": [0, 1]})
    cut = pickle.dumps({"trials": list(range(1000))})[:-20]
    tune = _sweep_tune_dir(tmp_path, cut, earlier_searcher=earlier)
    lines = []
    assert repair_tune_state(str(tune), log=lines.append) == [str(tune / f"searcher-state-{SESSION}.pkl")]
    assert not marker.exists()
    assert sorted(p.name for p in tune.glob("searcher-state-*.pkl")) == [f"searcher-state-{EARLIER}.pkl"]
    assert (tune / f"searcher-state-{EARLIER}.pkl").read_bytes() == earlier
    assert (tune / f"searcher-state-{SESSION}.pkl.unreadable").read_bytes() == cut
    assert len(lines) == 1 and "set aside" in lines[0]
    # the intact search-generator states (pickles named .json) are left alone
    assert len(list(tune.glob("search_gen_state-*.json"))) == 2
