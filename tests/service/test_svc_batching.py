"""Micro-batching of predict requests (app.predict.Batcher) with a real torch model."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from app.predict import Batcher, ModelCache, predict
from lego_core.spec import MNIST_SPEC


class SlowLinear:
    """A classifier that records the batch sizes it sees and takes a little time per
    call, so that requests arriving meanwhile queue up."""

    def __init__(self, fail_on: int | None = None) -> None:
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 4))
        self.class_names = ["a", "b", "c", "d"]
        self.spec = MNIST_SPEC
        self.batches: list[int] = []
        self.threads: list[str] = []
        self.fail_on = fail_on

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(len(x))
        self.threads.append(threading.current_thread().name)
        time.sleep(0.02)
        if self.fail_on is not None and len(self.batches) == self.fail_on:
            raise RuntimeError("model exploded")
        return self.net(x)


def images(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return list(torch.rand(n, 1, 28, 28, generator=g))


def test_concurrent_requests_share_calls_and_get_their_own_answers():
    clf = SlowLinear()
    batcher = Batcher(clf, max_batch=16)
    try:
        requests = [images(1 + i % 3, seed=i) for i in range(40)]
        with ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(batcher.probabilities, requests))
        for req, got in zip(requests, answers, strict=True):
            with torch.no_grad():
                expected = torch.softmax(clf.net(torch.stack(req)), 1)
            assert got.shape == (len(req), 4)
            assert torch.allclose(got, expected, atol=1e-6)
        assert sum(clf.batches) == sum(len(r) for r in requests)
        assert max(clf.batches) > 3  # requests were batched together...
        assert max(clf.batches) <= 16  # ...never over the limit
    finally:
        batcher.close()


def test_a_request_that_finds_the_model_idle_runs_in_its_own_thread():
    clf = SlowLinear()
    batcher = Batcher(clf, max_batch=16)
    try:
        batcher.probabilities(images(1, seed=5))
        assert clf.threads == [threading.current_thread().name]
    finally:
        batcher.close()


def test_large_request_runs_in_chunks_and_top_k():
    clf = SlowLinear()
    batcher = Batcher(clf, max_batch=8)
    try:
        out = predict(batcher, images(20, seed=1), top_k=2)
        assert len(out) == 20 and all(len(row) == 2 for row in out)
        assert all(row[0]["probability"] >= row[1]["probability"] for row in out)
        assert clf.batches == [8, 8, 4]
    finally:
        batcher.close()


def test_error_reaches_every_request_of_the_call_and_the_next_calls_work():
    clf = SlowLinear(fail_on=1)
    batcher = Batcher(clf, max_batch=16)
    try:
        with pytest.raises(RuntimeError, match="model exploded"):
            batcher.probabilities(images(2, seed=2))
        assert batcher.probabilities(images(2, seed=3)).shape == (2, 4)
    finally:
        batcher.close()


def test_closed_batcher_still_answers_and_eviction_closes():
    cache = ModelCache(1)
    first = cache.get("one", lambda: Batcher(SlowLinear(), 4))
    holders = []

    def hold():  # a request that got the batcher just before it was evicted
        holders.append(first.probabilities(images(1, seed=4)))

    cache.get("two", lambda: Batcher(SlowLinear(), 4))  # evicts and closes "one"
    t = threading.Thread(target=hold)
    t.start()
    t.join(10)
    assert not t.is_alive() and holders[0].shape == (1, 4)
    first._thread.join(5)
    assert not first._thread.is_alive()
    cache.clear()
