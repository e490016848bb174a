"""Schemes are plug-ins: a scheme registered here, in this one file, is listed, validated, planned, run on
digits through ``kdray.distill`` and tracked in MLflow, with no edit to kdray; a section of another scheme
than the chosen one fails in one line."""
import pathlib

import pytest

import kdray
from kdray.config import ConfigError, load_config
from kdray.orchestrator.plan import (Scheme, get_scheme, list_schemes, method_label, register_scheme, stage,
                                     unregister_scheme)
from jobs import digits_job

NAME = "student_pair"


class StudentPair(Scheme):
    """A teacher-free scheme: per seed a student from scratch, then a second student it teaches; the finish
    step records how much the taught one gained over its teacher."""

    name = NAME
    help = "a student trained from scratch teaches a second student of the same kind (methods: [...])"

    def check(self, cfg):
        if cfg.teacher is not None or not cfg.methods:
            raise ValueError(f"scheme {NAME!r} needs methods and no teacher")

    def plan(self, cfg):
        stages = []
        for seed in cfg.seeds:
            first = f"first-seed{seed}"
            stages.append(stage(first, "scratch", seed, "student", cfg.student.model, keep=True))
            stages.append(stage(f"second-seed{seed}", "distill", seed, "student", cfg.student.model,
                                [f"stage:{first}"], methods=method_label(cfg)))
        return stages

    def finish_inputs(self, cfg, stages):
        return [s.name for s in stages]

    def finish(self, cfg, stages, splits, ctx, job_state):
        done = job_state.done
        for seed in cfg.seeds:
            second = done[f"second-seed{seed}"]
            second["gain_over_first"] = second["test_top1"] - done[f"first-seed{seed}"]["test_top1"]


@pytest.fixture
def pair_scheme():
    register_scheme(StudentPair)
    yield get_scheme(NAME)
    unregister_scheme(NAME)


def _pair_job(tmp_path, mlflow_uri=None, **over):
    cfg = digits_job(tmp_path, mlflow_uri, scheme=NAME, **over)
    cfg.pop("teacher")
    return cfg


def test_a_registered_scheme_is_listed_and_validated(tmp_path, pair_scheme, capsys):
    from kdray.config import SCHEMES, SCHEME_HELP
    from kdray.orchestrator.cli import main

    assert SCHEMES[-1] == NAME and SCHEME_HELP[NAME] == StudentPair.help
    assert main(["list", "schemes"]) == 0
    assert f"{NAME}\t{StudentPair.help}" in capsys.readouterr().out.splitlines()
    with pytest.raises(ConfigError, match=f"^config: scheme '{NAME}' needs methods and no teacher$"):
        load_config(digits_job(tmp_path, scheme=NAME))
    unregister_scheme(NAME)
    with pytest.raises(ConfigError, match=f"^scheme: Input should be .*'multi_teacher'.* \\(got '{NAME}'\\)$"):
        load_config(_pair_job(tmp_path))


def test_a_scheme_in_one_module_runs_through_distill_into_mlflow(tmp_path, mlflow_uri, pair_scheme):
    result = kdray.distill(_pair_job(tmp_path, mlflow_uri, seeds=[0, 1]))
    assert [(s["name"], s["kind"]) for s in result.stages] == [
        ("first-seed0", "scratch"), ("second-seed0", "distill"), ("first-seed1", "scratch"),
        ("second-seed1", "distill")]
    for seed in (0, 1):
        first, second = result.stages[2 * seed], result.stages[2 * seed + 1]
        assert first["test_top1"] > 0.5 and second["teachers"] == [f"stage:first-seed{seed}"]
        assert second["gain_over_first"] == pytest.approx(second["test_top1"] - first["test_top1"])
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    exp = client.get_run(result.parent_run_id).info.experiment_id
    runs = client.search_runs([exp], f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert {r.info.run_name: r.info.status for r in runs} == {s["name"]: "FINISHED" for s in result.stages}
    assert all("test_top1" in r.data.metrics for r in runs)
    # The one file a new scheme touches is its module (here this test): kdray itself never names it.
    package = pathlib.Path(kdray.__file__).parent
    assert not [p for p in package.rglob("*.py") if NAME in p.read_text()]


def test_builtin_schemes_keep_their_order_and_sections():
    assert list(list_schemes())[:14] == ["offline", "online", "self", "assistant", "multi_teacher", "adversarial",
                                         "data_free", "deep_inversion", "quantized", "graph",
                                         "lifelong", "cross_modal", "rco", "lm"]
    assert {n: s.sections for n, s in list_schemes().items()} == {
        "offline": ("teacher",), "online": ("online",), "self": ("self_distill",),
        "assistant": ("teacher", "assistants"), "multi_teacher": ("teachers", "ensemble"),
        "adversarial": ("teacher", "teachers", "ensemble", "adversarial"),
        "data_free": ("teacher", "data_free"), "deep_inversion": ("teacher", "deep_inversion"),
        "quantized": ("teacher", "quantized"), "graph": ("teacher", "graph"),
        "lifelong": ("lifelong",), "cross_modal": ("teacher", "cross_modal"), "rco": ("teacher", "rco"),
        "lm": ("teacher", "teachers", "lm")}


CNN8 = {"model": "digits_cnn", "args": {"width": 8}}


@pytest.mark.parametrize("over,section,owner", [
    (dict(online={"peers": [CNN8, CNN8]}), "online", "'online'"),
    (dict(assistants=[CNN8]), "assistants", "'assistant'"),
    (dict(self_distill={"method": "byot"}), "self_distill", "'self'"),
    (dict(teachers=[{"model": "digits_cnn", "train": {}}] * 2), "teachers", "'multi_teacher' or 'adversarial' or 'lm'"),
    (dict(ensemble={"combine": "confidence"}), "ensemble", "'multi_teacher' or 'adversarial'"),
    (dict(scheme="self", teacher=None, online={"mode": "ensemble"}), "online", "'online'"),
    (dict(scheme="online", teacher=None, methods=[], online={"peers": [CNN8, CNN8]}, ensemble={"shard": False}),
     "ensemble", "'multi_teacher' or 'adversarial'"),
])
def test_a_section_of_another_scheme_fails_in_one_line(tmp_path, over, section, owner):
    cfg = digits_job(tmp_path, **over)
    if cfg.get("teacher") is None:
        cfg.pop("teacher", None)
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    line = str(err.value)
    scheme = cfg.get("scheme", "offline")
    assert line == (f"config: {section}: is a section of scheme {owner}, not of scheme {scheme!r}; remove it or "
                    f"set scheme: {owner.split(' or ')[0].strip(chr(39))} (see `kdray list schemes`)"), line


def test_a_dumped_config_and_a_default_section_are_not_foreign(tmp_path):
    cfg = load_config(digits_job(tmp_path, online={}))  # given, but empty: nothing is ignored
    assert cfg.scheme == "offline"
    again = load_config(cfg, ["train.epochs=2"])  # model_dump() gives every section, at its default
    assert again.train.epochs == 2 and again.online == cfg.online


def test_stages_and_teacher_sources_are_typed_and_checked():
    from kdray.orchestrator.plan import TeacherSource, from_stage

    assert TeacherSource.parse("spec:teachers.1") == TeacherSource("spec", "teachers.1")
    assert str(TeacherSource.parse(from_stage("gen0-seed0"))) == "stage:gen0-seed0"
    planned = stage("s", "distill", 0, "student", "m", [from_stage("a"), "spec:teacher", from_stage("b")])
    assert planned.stage_teachers() == ["a", "b"] and stage("t", "teacher", 0, "teacher", "m").stage_teachers() == []
    assert planned.row()["teachers"] == ["stage:a", "spec:teacher", "stage:b"]  # plain values: weights_only, MLflow
    assert "teachers" not in stage("t", "teacher", 0, "teacher", "m").row()
    assert stage("t", "teacher", 0, "teacher", "m", keep=True).row()["keep"] is True
    with pytest.raises(ValueError, match="neither stage:<name> nor spec:<config path>"):
        TeacherSource.parse("teacher")


def test_an_installed_package_registers_its_scheme_through_an_entry_point():
    """``[project.entry-points."kdray.schemes"] pair = "test_scheme_registry:StudentPair"``: loaded by name,
    registered, listed after the built-ins; a class entry point (not a module) is registered here."""
    from importlib.metadata import EntryPoint

    from kdray.orchestrator.plan import ENTRY_POINT_GROUP, load_plugin_schemes

    point = EntryPoint(name="pair", value=f"{__name__}:StudentPair", group=ENTRY_POINT_GROUP)
    assert NAME not in list_schemes()
    try:
        load_plugin_schemes([point])
        assert list(list_schemes())[-1] == NAME and type(get_scheme(NAME)).__name__ == "StudentPair"
    finally:
        unregister_scheme(NAME)
