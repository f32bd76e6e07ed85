"""lego_core.fidelity: located components scored against their source on the located
images, and what `locate_checked` reports and keeps. (The relaxation itself, on a
model whose defaults cut too deep, is in tests/test_zoo.py.)"""

from __future__ import annotations

import pytest
import torch

from lego_core import (
    MNIST_SPEC,
    Locator,
    check_components,
    check_warning,
    disassemble,
    locate,
    locate_checked,
    source_from_module,
)
from lego_core.data import normalize
from lego_core.fidelity import CHECK_SETS, check_sets, keeps_decisions

DIGITS = [str(i) for i in range(10)]


def test_check_sets_are_disjoint_fixed_and_cover_small_models():
    sets = check_sets(list(range(10)))
    assert [len(s) for s in sets] == [3, 3, 4]
    flat = [c for s in sets for c in s]
    assert sorted(flat) == list(range(10))
    assert check_sets(list(range(10))) == sets  # the same sets every time
    assert [sorted(s) for s in check_sets([4, 7])] == [[4, 7]]
    assert check_sets([3]) == []
    many = check_sets(list(range(1000)))
    assert len(many) == CHECK_SETS and all(len(s) == 3 for s in many)
    assert len({c for s in many for c in s}) == 3 * CHECK_SETS


@pytest.mark.parametrize(
    ("source", "component", "kept"),
    [
        (1.0, 0.67, True),  # exactly half of the source's margin over 1/3
        (1.0, 0.6, False),
        (0.9, 0.62, True),
        (0.5, 0.0, True),  # a source within 0.2 of chance has nothing to keep
    ],
)
def test_a_set_keeps_decisions_with_half_its_sources_margin(source, component, kept):
    assert keeps_decisions(source, component, 3) is kept


@pytest.fixture(scope="module")
def lenet(lenet_mnist):
    return source_from_module(lenet_mnist, MNIST_SPEC, DIGITS, "lenet")


def test_located_lenet_passes_the_check_at_the_defaults(lenet, mnist_train):
    """Where MDA's defaults keep the source's decisions nothing changes: the masks
    are `locate`'s, and the report says what was scored."""
    plain = locate(lenet, mnist_train, samples_per_class=50)
    checked = locate_checked(lenet, mnist_train, samples_per_class=50)
    check = checked.parameters["check"]
    assert check["passed"] and check["relaxed"] == 0
    assert check_warning(checked) is None
    for c in plain.masks:
        for layer, mask in plain.masks[c].items():
            assert torch.equal(checked.masks[c][layer], mask), (c, layer)
    assert {k: checked.parameters[k] for k in ("alpha", "beta")} == {
        k: plain.parameters[k] for k in ("alpha", "beta")
    }
    # Each set's scores are the source's and the component's on its located images
    # (150 of them: scored in two batches).
    first = check["sets"][0]
    classes = [DIGITS.index(n) for n in first["classes"]]
    rows = torch.cat([checked.selected[c] for c in classes])
    x = normalize(mnist_train.images[rows], MNIST_SPEC)
    y = torch.arange(len(classes)).repeat_interleave(50)
    with torch.no_grad():
        comp = disassemble(lenet, checked, classes, data=mnist_train)
        accuracy = float((comp.net()(x).argmax(1) == y).float().mean())
        source = float((lenet.net()(x)[:, classes].argmax(1) == y).float().mean())
    assert first["component"] == pytest.approx(accuracy, abs=1e-4)
    assert first["source"] == pytest.approx(source, abs=1e-4)
    assert 0 < first["params"] < 1


def test_thresholds_that_cut_everything_are_reported_not_changed(lenet, mnist_train):
    """Thresholds given by the caller stay; the check says the components lost their
    source's decisions."""
    harsh = locate_checked(lenet, mnist_train, samples_per_class=20, alpha=0.99, beta=0.99)
    check = harsh.parameters["check"]
    assert harsh.parameters["alpha"] == {"conv": 0.99, "linear": 0.99}
    assert check["relaxed"] == 0 and not check["passed"]
    failed = [s for s in check["sets"] if not s["kept"]]
    assert failed and all(s["component"] < s["source"] for s in failed)
    warning = check_warning(harsh)
    assert "do not keep their source's decisions" in warning and failed[0]["classes"][0] in warning
    assert check_components(lenet, harsh, mnist_train) == check["sets"]


def test_a_locator_locates_again_at_other_thresholds_with_one_mask_pass(lenet, mnist_train):
    """`Locator` keeps the selected samples and, where they fit in one part, the
    contribution sums: its second call reports neither selection nor contributions
    and gives `locate`'s masks at those thresholds. (The relaxed steps of
    `locate_checked` go through one Locator.)"""
    locator = Locator(lenet, mnist_train, samples_per_class=20)
    messages: list[list[str]] = [[], []]
    first = locator(progress=lambda f, m: messages[0].append(m))
    second = locator(alpha=0.1, beta=0.05, progress=lambda f, m: messages[1].append(m))
    assert {"selecting samples", "computing contributions"} <= set(messages[0])
    assert not {"selecting samples", "computing contributions"} & set(messages[1])
    for comps, (alpha, beta) in ((first, (None, None)), (second, (0.1, 0.05))):
        plain = locate(lenet, mnist_train, samples_per_class=20, alpha=alpha, beta=beta)
        assert comps.parameters == plain.parameters
        for c in plain.masks:
            assert torch.equal(comps.selected[c], plain.selected[c])
            for layer, mask in plain.masks[c].items():
                assert torch.equal(comps.masks[c][layer], mask), (c, layer)
    # Looser thresholds keep more.
    kept = [sum(int(m.sum()) for m in comps.masks[0].values()) for comps in (first, second)]
    assert kept[1] > kept[0]
