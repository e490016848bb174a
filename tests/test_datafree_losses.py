"""Data-free distillation's generator and losses against values computed by hand on fixed tensors
(kdray/algorithms/datafree): DAFL's three generator terms, DFAD's discrepancy, DeepInversion's BatchNorm
statistics and total-variation prior; and the one-line errors a data-free run gives before training."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from kdray.algorithms.datafree.generator import Generator, check_generator
from kdray.algorithms.datafree.losses import (BatchNormStatistics, activation_loss, dafl_generator_loss,
                                              discrepancy_l1, information_entropy_loss, one_hot_loss,
                                              spatial_attention, total_variation_l2, zskt_attention)
from kdray.models import create_model


def test_one_hot_loss_is_cross_entropy_against_the_teachers_own_argmax():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # arg-max 0 and 1
    want = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(-1.0))) / 2
    assert one_hot_loss(logits).item() == pytest.approx(want, abs=1e-6)


def test_activation_loss_is_minus_the_mean_absolute_activation():
    assert activation_loss(torch.tensor([[1.0, -2.0], [3.0, 0.0]])).item() == pytest.approx(-1.5)


def test_information_entropy_loss_is_minus_the_entropy_of_the_mean_prediction():
    # p_mean = mean of softmax([0, ln 3]) = (1/4, 3/4) and softmax([ln 3, 0]) = (3/4, 1/4) -> (1/2, 1/2)
    balanced = torch.tensor([[0.0, math.log(3.0)], [math.log(3.0), 0.0]])
    assert information_entropy_loss(balanced).item() == pytest.approx(-math.log(2.0), abs=1e-6)
    one_class = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])  # p_mean = (1/4, 3/4)
    want = 0.25 * math.log(0.25) + 0.75 * math.log(0.75)
    assert information_entropy_loss(one_class).item() == pytest.approx(want, abs=1e-6)
    assert information_entropy_loss(balanced) < information_entropy_loss(one_class)  # balanced batches win


def test_dafl_generator_loss_weights_its_parts_as_the_paper():
    logits, feats = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, -2.0], [3.0, 0.0]])
    parts = dafl_generator_loss(logits, feats, alpha=0.1, beta=5.0)
    want = parts["one_hot"] + 0.1 * parts["activation"] + 5.0 * parts["information_entropy"]
    assert parts["generator"].item() == pytest.approx(want.item())
    assert parts["activation"].item() == pytest.approx(-1.5)


def test_dfad_discrepancy_is_the_mean_absolute_logit_difference():
    t, s = torch.tensor([[1.0, 2.0], [0.0, -1.0]]), torch.tensor([[0.5, 2.0], [1.0, 1.0]])
    assert discrepancy_l1(t, s).item() == pytest.approx((0.5 + 0.0 + 1.0 + 2.0) / 4)


def test_total_variation_is_the_sum_of_the_four_neighbour_difference_norms():
    x = torch.tensor([[[[1.0, 2.0], [4.0, 8.0]]]])
    # horizontal (1-2, 4-8), vertical (1-4, 2-8), diagonal (4-2), anti-diagonal (1-8)
    want = math.hypot(1, 4) + math.hypot(3, 6) + 2.0 + 7.0
    assert total_variation_l2(x).item() == pytest.approx(want, abs=1e-5)


def test_batchnorm_statistics_distance_from_the_running_statistics():
    bn = nn.BatchNorm2d(2)
    bn.running_mean.copy_(torch.tensor([0.0, 1.0]))
    bn.running_var.copy_(torch.tensor([1.0, 4.0]))
    model = nn.Sequential(bn).eval()
    stats = BatchNormStatistics(model)
    x = torch.tensor([[[[1.0, 3.0]], [[0.0, 0.0]]]])  # channel 0: mean 2, var 1; channel 1: mean 0, var 0
    model(x)
    want = math.hypot(0 - 2, 1 - 0) + math.hypot(1 - 1, 4 - 0)
    assert stats.loss().item() == pytest.approx(want, abs=1e-6)
    assert stats.loss() == 0  # each forward's distances are read once
    stats.remove()
    model(x)
    assert stats.distances == []


def test_the_generator_makes_teacher_shaped_batches_that_train():
    torch.manual_seed(0)
    gen = Generator(latent_dim=16, channels=1, image_size=8, width=32)
    images = gen(gen.sample(4, torch.Generator().manual_seed(0)))
    assert images.shape == (4, 1, 8, 8)
    teacher = create_model("digits_cnn", 10).eval()
    check_generator(gen, (1, 8, 8), 16)
    loss = dafl_generator_loss(teacher(images), images.flatten(1))["generator"]
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gen.parameters())
    a, b = gen.sample(3, torch.Generator().manual_seed(1)), gen.sample(3, torch.Generator().manual_seed(2))
    assert not torch.equal(a, b)  # per-worker seeds: other samples


def test_a_generator_that_does_not_make_the_teachers_inputs_is_one_line():
    gen = Generator(latent_dim=8, channels=3, image_size=8, width=16)
    with pytest.raises(ValueError) as err:
        check_generator(gen, (1, 8, 8), 8)
    assert "\n" not in str(err.value) and "(3, 8, 8)" in str(err.value) and "(1, 8, 8)" in str(err.value)
    with pytest.raises(ValueError, match="multiple of 4"):
        Generator(image_size=10)


def test_deepinversion_of_a_teacher_without_batchnorm_is_one_line():
    with pytest.raises(ValueError) as err:
        BatchNormStatistics(create_model("digits_mlp", 10))
    assert "\n" not in str(err.value) and "no BatchNorm2d" in str(err.value)


def test_zskt_attention_is_the_mean_squared_difference_of_normalised_attention_maps():
    # student map: channel mean of squares of [[1, 0]] and [[1, 0]] -> [1, 0]; teacher: [[1, 1]] -> [1, 1]/sqrt 2
    s = torch.tensor([[[[1.0, 0.0]], [[-1.0, 0.0]]]])  # (1, 2, 1, 2)
    t = torch.tensor([[[[1.0, 1.0]]]])  # (1, 1, 1, 2): channels may differ
    assert spatial_attention(t)[0].tolist() == pytest.approx([2 ** -0.5, 2 ** -0.5])
    one_block = ((1 - 2 ** -0.5) ** 2 + 0.5) / 2  # = 1 - 1/sqrt 2
    assert zskt_attention([s], [t]).item() == pytest.approx(one_block, abs=1e-6)
    assert zskt_attention([s, s], [t, s]).item() == pytest.approx(one_block, abs=1e-6)  # summed over blocks
    # a 2x2 teacher map is pooled to the student's 1x2 (its rows averaged) before the maps are compared
    t2 = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]]])
    assert zskt_attention([s], [t2]).item() == pytest.approx(one_block, abs=1e-6)
    with pytest.raises(ValueError, match="pairs blocks one to one: 1 student and 2 teacher"):
        zskt_attention([s], [t, t])
