"""Inputs a careless user or another local user could give: no code run that was not asked for, no file
written outside the job's own directory."""
from __future__ import annotations

import json
import os
import pickle

import pytest

import kdray
from jobs import digits_job
from kdray.config import ConfigError
from kdray.orchestrator.cli import main
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


@pytest.mark.parametrize("name", ["..", ".", "a/b", ""])
def test_a_job_name_that_is_not_one_directory_is_refused(workdir, capsys, name):
    assert main(["run", "digits", f"name={name}", "output_dir=out"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdray: error: name: ") and "not '.' or '..'" in err and "\n" not in err
    assert not os.listdir(workdir)


@pytest.mark.parametrize("name", ["..", "a/b"])
def test_a_sweep_name_that_is_not_one_directory_is_refused(workdir, capsys, name):
    assert main(["sweep", "digits_sweep", f"name={name}", "output_dir=out"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdray: error: name: ") and "\n" not in err
    with pytest.raises(ConfigError, match=r"^name: .*\(got '\.\.'\)$"):
        kdray.sweep({"train.lr": {"float": [0.01, 0.1]}}, "digits", name="..",
                    output_dir="out")
    assert not os.listdir(workdir)


def _tree(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files}


def _outside_the_job(tmp_path, **over) -> tuple[set[str], set[str]]:
    """Run a tiny job from ``tmp_path`` (relative writes land there) with its MLflow store in
    ``tmp_path/store``; returns the new files outside ``out/j/`` and those inside."""
    store = tmp_path / "store"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    before = _tree(tmp_path)
    cfg = digits_job(tmp_path, uri, name="j", output_dir=str(tmp_path / "out"), train__epochs=1,
                     teacher__train__epochs=1, checkpoint__every_epochs=1, **over)
    kdray.distill(cfg)
    new = _tree(tmp_path) - before
    inside = {p for p in new if p.startswith(os.path.join("out", "j") + os.sep)}
    return {p for p in new - inside if not p.startswith("store" + os.sep)}, inside


def test_an_in_process_job_writes_only_inside_its_directory(workdir):
    outside, inside = _outside_the_job(workdir)
    assert not outside, sorted(outside)
    assert any(p.endswith("state.pt") for p in inside)


@pytest.mark.ray
def test_a_ray_train_job_writes_only_inside_its_directory(workdir, ray_session):
    outside, inside = _outside_the_job(workdir, ray__num_workers=1)
    assert not outside, sorted(outside)
    assert any(os.sep + "checkpoint_" in p for p in inside), sorted(inside)
