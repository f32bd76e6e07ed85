"""The decision stage's closed-form fit (lego_core.decide)."""

from __future__ import annotations

import torch

from lego_core import decide
from lego_core.decide import (
    MAX_QUADRATIC_RANK,
    combine,
    fit_decision_stage,
    fit_gaussian_discriminant,
    flat_features,
    quadratic_rank,
    stage_flops,
)


def gaussian_classes(n: int, seed: int = 0):
    """Three classes in 6 dimensions with one shared, correlated covariance,
    plus a constant feature and an uninformative one on a much larger scale."""
    g = torch.Generator().manual_seed(seed)
    means = torch.tensor([[0.0] * 6, [2.0, 0, 0, 0, 0, 0], [0, 2.0, 0, 0, 0, 0]])
    mix = torch.eye(6) + 0.5 * torch.randn(6, 6, generator=g)
    labels = torch.arange(3).repeat_interleave(n)
    z = means[labels] + torch.randn(3 * n, 6, generator=g) @ mix.T
    noise = 1000 * torch.randn(3 * n, 1, generator=g)
    z = torch.cat([z, torch.ones(3 * n, 1), noise], 1)
    return z, labels, means, mix


def test_fit_matches_the_bayes_rule_of_the_true_gaussians():
    z, y, means, mix = gaussian_classes(4000)
    weight, bias, info = fit_gaussian_discriminant(z, y, 3, shrinkage=0.0)
    assert info["live_features"] == 7  # the constant feature gets no weight
    assert torch.all(weight[:, 6] == 0)
    test, labels, _, _ = gaussian_classes(2000, seed=1)
    fitted = (test @ weight.T + bias).argmax(1)
    precision = torch.linalg.inv(mix @ mix.T)
    w = means @ precision
    b = -0.5 * (w * means).sum(1)
    bayes = (test[:, :6] @ w.T + b).argmax(1)
    assert float((fitted == bayes).float().mean()) > 0.98
    accuracy = float((fitted == labels).float().mean())
    assert accuracy >= float((bayes == labels).float().mean()) - 0.01 > 1 / 3


def test_shrinkage_is_chosen_from_the_data():
    z, y, _, _ = gaussian_classes(20)
    _, _, few = fit_gaussian_discriminant(z, y, 3)
    z, y, _, _ = gaussian_classes(2000)
    _, _, many = fit_gaussian_discriminant(z, y, 3)
    assert 0 <= many["shrinkage"] < few["shrinkage"] <= 1


def test_factorised_outputs_are_log_probabilities_with_the_components_order():
    scores = torch.randn(5, 5)
    logits = torch.randn(5, 5)
    out = combine(scores, logits, [2, 3], "factorised")
    assert torch.allclose(out.exp().sum(1), torch.ones(5), atol=1e-5)
    # within a part, the order is the component's own
    assert torch.equal(out[:, :2].argmax(1), logits[:, :2].argmax(1))
    assert torch.equal(out[:, 2:].argmax(1), logits[:, 2:].argmax(1))
    assert torch.equal(combine(scores, logits, [2, 3], "joint"), scores)


def test_pooled_taps_give_mean_and_max_per_channel():
    maps = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    hidden = torch.ones(2, 4)
    out = flat_features([maps, hidden], ["pool", "flat"])
    assert out.shape == (2, 3 + 3 + 4)
    assert torch.equal(out[:, :3], maps.mean((2, 3)))
    assert torch.equal(out[:, 3:6], maps.amax((2, 3)))


def test_second_order_features_separate_classes_that_differ_only_in_spread():
    # Two classes with the same mean: one tight, one wide. No linear rule beats
    # chance; the products of the principal components tell them apart.
    g = torch.Generator().manual_seed(0)
    n = 4000
    labels = torch.arange(2).repeat_interleave(n)
    scale = torch.tensor([0.5, 2.0])[labels].unsqueeze(1)
    z = torch.randn(2 * n, 4, generator=g) * scale
    test_labels = torch.arange(2).repeat_interleave(1000)
    test = torch.randn(2000, 4, generator=g) * torch.tensor([0.5, 2.0])[test_labels].unsqueeze(1)
    linear, info = fit_decision_stage(z, labels, 2, rank=0)
    quadratic, qinfo = fit_decision_stage(z, labels, 2, rank=4)
    assert info["quadratic_rank"] == 0 and qinfo["quadratic_rank"] == 4

    def accuracy(stage):
        return float((stage(test).argmax(1) == test_labels).float().mean())

    # (the Bayes rule reaches 0.96 here; one shared covariance over the products
    # puts the threshold off its optimum when the spreads differ 4x, so 0.85)
    assert accuracy(linear) < 0.6
    assert accuracy(quadratic) > 0.8


def test_quadratic_rank_follows_the_pool_size():
    assert quadratic_rank(1000, 500, 10) == 0  # too few samples a product
    assert quadratic_rank(10_000, 500, 10) == 32
    assert quadratic_rank(50_000, 500, 10) == MAX_QUADRATIC_RANK
    assert quadratic_rank(50_000, 20, 10) == 16  # never more components than features
    # and never more than the FLOPs budget allows
    assert stage_flops(500, 10, 16) <= 40_000 < stage_flops(500, 10, 32)
    assert quadratic_rank(50_000, 500, 10, flops_budget=40_000) == 16
    assert quadratic_rank(50_000, 500, 10, flops_budget=1_000) == 0


def test_stage_size_counts_what_it_holds_and_computes():
    z, y, _, _ = gaussian_classes(3000)
    stage, info = fit_decision_stage(z, y, 3, rank=4)
    params, flops = stage.size()
    assert params == sum(b.numel() for b in stage.buffers())
    linear, _ = fit_decision_stage(z, y, 3, rank=0)
    assert linear.size() == (3 * 8 + 3, 2 * 3 * 8)
    assert flops > linear.size()[1]


def test_the_fit_in_blocks_equals_the_fit_in_one_block(monkeypatch):
    # The statistics are accumulated FIT_BLOCK samples at a time so that a pool
    # of 100,000 samples never holds its float64 products at once.
    z, y, _, _ = gaussian_classes(700)
    test, _, _, _ = gaussian_classes(300, seed=1)
    outputs = []
    for block in (10**6, 256):
        monkeypatch.setattr(decide, "FIT_BLOCK", block)
        stage, _ = fit_decision_stage(z, y, 3, rank=4)
        with torch.no_grad():
            outputs.append(stage(test))
    assert torch.allclose(outputs[0], outputs[1], rtol=1e-4, atol=1e-4)
