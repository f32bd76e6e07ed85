"""The decision stage's closed-form fit (lego_core.decide)."""

from __future__ import annotations

import torch

from lego_core.decide import combine, fit_gaussian_discriminant, flat_features


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
