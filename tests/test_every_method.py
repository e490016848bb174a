"""Every registered knowledge term, iterated from the registry: gradients reach the student and its
connectors but never the teacher, and a short training on digits lowers the loss. A method is tested here
the moment it registers (these were three hand-kept lists in the response, feature and relation files)."""
from __future__ import annotations

import math

import pytest

from kdray.algorithms import list_methods
from tests.method_harness import assert_gradients_reach_student_and_connectors, short_training

# parameters that make a method's default phase its distillation phase at epoch 0
MAIN_PHASE = {"ft": {"paraphraser_epochs": 0}}
# text terms need the transformer feature-point contract: tests/text_features.py checks them on a tiny encoder
METHODS = sorted(name for name, cls in list_methods().items() if cls.modality != "text")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_student_and_connectors_not_teacher(method):
    assert_gradients_reach_student_and_connectors(method, **MAIN_PHASE.get(method, {}))


@pytest.mark.parametrize("method", METHODS)
def test_short_training_lowers_the_loss(method):
    losses = short_training(method, **MAIN_PHASE.get(method, {}))
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], losses
