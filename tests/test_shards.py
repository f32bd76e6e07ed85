"""Locating in shards (lego_core.shards): selection shards merged, contribution shards
added in any order and masks computed once give exactly one pass's result."""

from __future__ import annotations

import random

import pytest
import torch

from lego_core import DEFAULT_ALPHA, DEFAULT_BETA, MNIST_SPEC, build_model, locate
from lego_core import source_from_module as capture
from lego_core.contributions import add_sums
from lego_core.locate import contribution_sums, masks_from_sums, select_samples, shard_plan
from lego_core.shards import (
    candidates_from_state,
    candidates_state,
    load_shard,
    merge_selections,
    save_shard,
    select_shard,
    selection_ranges,
)
from lego_core.train import train

N = 20


@pytest.fixture(scope="module")
def setup(mnist_test):
    """A LeNet trained briefly (saturated probabilities: many ties at the top) and
    1300 test images (six selection batches, the last one partial)."""
    data = mnist_test.subset(torch.arange(0, len(mnist_test), 7)[:1300])  # every digit
    torch.manual_seed(0)
    net = train(build_model("lenet", 10, MNIST_SPEC), data, MNIST_SPEC, epochs=2, progress=False)
    return capture(net, MNIST_SPEC, data.class_names, "lenet", "lenet"), data


def test_selection_ranges_cover_the_rows_on_batch_boundaries():
    assert selection_ranges(1300, 3) == [(0, 512), (512, 1024), (1024, 1300)]
    assert selection_ranges(100, 4) == [(0, 100)]
    for rows, shards in ((1300, 5), (5000, 7), (256, 2)):
        ranges = selection_ranges(rows, shards)
        assert ranges[0][0] == 0 and ranges[-1][1] == rows
        assert all(
            a % 256 == 0 and b == c for (a, b), (c, _) in zip(ranges, ranges[1:], strict=False)
        )


@pytest.mark.parametrize("shards", [1, 2, 3, 5])
def test_merged_selection_shards_equal_one_pass(setup, shards):
    model, data = setup
    one = select_samples(model, data, N)
    parts = [select_shard(model, data, a, b, N) for a, b in selection_ranges(len(data), shards)]
    random.Random(shards).shuffle(parts)  # shards finish in any order
    merged = merge_selections(parts, N)
    assert merged.keys() == one.keys()
    for c in one:
        assert torch.equal(merged[c], one[c]), c


def test_sharded_locate_from_stored_shard_results_equals_one_pass(setup, tmp_path):
    """Every shard's result goes through a file (as between workers); a shard stored
    twice is one file, so it counts once."""
    model, data = setup
    ranges = selection_ranges(len(data), 3)
    for k, (a, b) in enumerate(ranges):
        save_shard(
            tmp_path / f"select-{k}.pt", candidates_state(select_shard(model, data, a, b, N))
        )
    save_shard(tmp_path / "select-1.pt", candidates_state(select_shard(model, data, *ranges[1], N)))
    stored = [candidates_from_state(load_shard(p)) for p in sorted(tmp_path.glob("select-*.pt"))]
    assert len(stored) == len(ranges)
    selected = merge_selections(stored, N)

    plan = shard_plan(selected, 3)
    for k, (idx, lab) in enumerate(plan):
        save_shard(tmp_path / f"sums-{k}.pt", contribution_sums(model, data, idx, lab))
    sums: dict = {}
    assert len(plan) == 2  # 200 samples: two contribution batches
    for k in (1, 0):  # added in another order than computed
        sums = add_sums(sums, load_shard(tmp_path / f"sums-{k}.pt"))
    masks = masks_from_sums(model, sums, sorted(selected), DEFAULT_ALPHA, DEFAULT_BETA)

    one = locate(model, data, samples_per_class=N, with_stats=False)
    assert masks.keys() == one.masks.keys()
    for c in one.masks:
        assert torch.equal(one.selected[c], selected[c])
        for layer, mask in one.masks[c].items():
            assert torch.equal(masks[c][layer], mask), (c, layer)
