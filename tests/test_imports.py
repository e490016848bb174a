"""Import hygiene: the pure-PyTorch layers load no orchestration stack, and no module leans on another's
private names (tools/check_private_imports.py, also run by .ci/run). Fast: subprocesses, no Ray."""
from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CHECKER = REPO / "tools" / "check_private_imports.py"
HEAVY = ("ray", "mlflow", "optuna", "pydantic")


def _loaded_after(statement: str) -> list[str]:
    """The heavy packages in ``sys.modules`` after ``statement`` in a fresh interpreter."""
    code = f"{statement}\nimport sys\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.split()


@pytest.mark.parametrize("package", ["kdray", "kdray.algorithms", "kdray.algorithms.base", "kdray.models",
                                     "kdray.data"])
def test_pure_layers_load_no_orchestration_stack(package):
    assert _loaded_after(f"import {package}") == []


def test_a_digits_model_and_its_data_path_load_no_torchvision():
    """torchvision (with the torch._dynamo / onnx modules it pulls in) costs ~25% of torch's own import in every Ray
    worker, trial and CLI subprocess: a digits job, which needs none of it, must not load it; a DeiT still can."""
    code = ("import sys, torch\nfrom kdray.models import create_model\nfrom kdray.data import build_datasets\n"
            "from kdray.data.device import device_refusal\n"
            "splits = build_datasets('digits', train_fraction=0.2)\ncreate_model('digits_cnn', 10)\n"
            "assert device_refusal(splits.train, torch.device('cpu')) is None\nprint('torchvision' in sys.modules)\n"
            "create_model('deit_vit', 10)\nprint('torchvision' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "True"]


def test_public_names_still_load_on_first_use():
    code = ("import kdray, kdray.config, kdray.search\n"
            "from kdray import Config, ConfigError, load_config, sweep, distill\n"
            "assert Config is kdray.config.Config and ConfigError is kdray.config.ConfigError\n"
            "assert load_config is kdray.config.load_config and sweep is kdray.search.sweep\n"
            "assert set(kdray.__all__) <= set(dir(kdray))\n"
            "try:\n    kdray.no_such_name\nexcept AttributeError as err:\n    print(err)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "module 'kdray' has no attribute 'no_such_name'"
    assert "pydantic" in _loaded_after("import kdray; kdray.Config")


def test_no_module_uses_another_modules_private_names():
    out = subprocess.run([sys.executable, str(CHECKER)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_private_import_checker_reports_each_use(tmp_path):
    offender = tmp_path / "offender.py"
    offender.write_text("import kdray.orchestrator.job\n"
                        "from kdray.orchestrator import job as j\n"
                        "from kdray.orchestrator.job import _hidden, plan_stages\n"
                        "def f():\n"
                        "    from kdray.orchestrator.api import _late\n"
                        "    return kdray.orchestrator.job._attr, j._other, plan_stages._fine, kdray.__version__\n")
    out = subprocess.run([sys.executable, str(CHECKER), str(offender)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stdout.splitlines() == [
        f"{offender}:3: from kdray.orchestrator.job import _hidden",
        f"{offender}:5: from kdray.orchestrator.api import _late",
        f"{offender}:6: kdray.orchestrator.job._attr (private name of kdray.orchestrator.job)",
        f"{offender}:6: j._other (private name of kdray.orchestrator.job)",
    ]


def test_unmarked_test_using_a_ray_fixture_is_refused():
    import conftest

    def item(marked: bool, fixtures: list[str]):
        return types.SimpleNamespace(nodeid="t", fixturenames=fixtures,
                                     get_closest_marker=lambda name: object() if marked and name == "ray" else None)

    with pytest.raises(pytest.fail.Exception, match="uses ray_session, which starts Ray: mark it @pytest.mark.ray"):
        conftest.pytest_runtest_setup(item(False, ["tmp_path", "ray_session"]))
    conftest.pytest_runtest_setup(item(True, ["ray_session"]))
    conftest.pytest_runtest_setup(item(False, ["tmp_path"]))


def test_import_layers_hold():
    """The import-linter contracts in pyproject.toml (function-level imports count) are kept."""
    out = subprocess.run(["lint-imports", "--no-cache"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_old_cli_entry_point_is_the_cli():
    import kdray.cli
    import kdray.orchestrator.cli

    assert kdray.orchestrator.cli.main is kdray.cli.main
