"""Every committed example config validates (a broken example is a broken promise in the README)."""
import glob
import os

import pytest

from kdray.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(__file__))
EXAMPLES = sorted(p for p in glob.glob(os.path.join(ROOT, "examples", "*.yaml"))
                  if os.path.basename(p) not in ("rayjob.yaml",) and "sweep" not in os.path.basename(p)
                  and "_nas" not in os.path.basename(p))  # NAS files: tests/test_blockwise_nas.py


@pytest.mark.parametrize("path", EXAMPLES, ids=[os.path.basename(p) for p in EXAMPLES])
def test_example_validates(path):
    if "cifar" in os.path.basename(path):
        pytest.importorskip("torchvision")
    load_config(path)


def test_packaged_digits_example_is_the_committed_one():
    with open(os.path.join(ROOT, "examples", "digits.yaml")) as a, \
            open(os.path.join(ROOT, "kdray", "examples", "digits.yaml")) as b:
        assert a.read() == b.read()


def test_online_worker_count_must_fit_peers():
    peers = [{"model": "digits_mlp"}] * 2
    with pytest.raises(ConfigError,
                       match=r"needs ray.num_workers = 2 x D \(one peer per worker, D data-parallel replicas.*got 3"):
        load_config({"scheme": "online", "student": {"model": "digits_mlp"}, "online": {"peers": peers},
                     "ray": {"num_workers": 3}})


SWEEPS = sorted(glob.glob(os.path.join(ROOT, "examples", "*sweep*.yaml")))


@pytest.mark.parametrize("path", SWEEPS, ids=[os.path.basename(p) for p in SWEEPS])
def test_example_sweep_validates_with_its_base(path):
    """A committed sweep example: its spec validates, its base job validates, and each searched path exists
    in the base's config (checked as the sweep would, before any trial)."""
    from kdray.search.space import apply_params, make_space
    from kdray.search.spec import base_raw, load_sweep_spec

    spec, where = load_sweep_spec(path)
    raw = base_raw(spec.base, where)
    base = load_config(raw)
    space = make_space(spec.space)
    configs = space.check_configs()
    assert configs
    for _, sampled in configs:  # every corner of the space is a valid job of the base's scheme
        assert load_config(apply_params(raw, space.resolve(sampled))).scheme == base.scheme
