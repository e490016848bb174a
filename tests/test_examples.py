"""Every committed example config validates (a broken example is a broken promise in the README)."""
import glob
import os

import pytest

from kdray.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(__file__))
EXAMPLES = sorted(p for p in glob.glob(os.path.join(ROOT, "examples", "*.yaml"))
                  if os.path.basename(p) not in ("rayjob.yaml",) and "sweep" not in os.path.basename(p))


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
