"""Shared fixtures: real MNIST from the shared data directory and small source
models trained on it with fixed seeds (cached for the session)."""

from __future__ import annotations

import pytest
import torch

from lego_core import MNIST_SPEC, build_model, load_image_folder, shared_data_dir
from lego_core.train import train


@pytest.fixture(scope="session")
def data_dir():
    path = shared_data_dir()
    if not (path / "mnist-train.tar.gz").exists():
        pytest.fail(f"shared data not found at {path}; set LEGO_DATA_DIR")
    return path


@pytest.fixture(scope="session")
def mnist_train(data_dir):
    return load_image_folder(data_dir / "mnist-train.tar.gz", MNIST_SPEC, progress=False)


@pytest.fixture(scope="session")
def mnist_test(data_dir):
    return load_image_folder(data_dir / "mnist-test.tar.gz", MNIST_SPEC, progress=False)


def train_lenet(data, seed: int, epochs: int = 1):
    torch.manual_seed(seed)
    model = build_model("lenet", len(data.class_names), MNIST_SPEC)
    return train(model, data, MNIST_SPEC, epochs=epochs, seed=seed, progress=False)


@pytest.fixture(scope="session")
def lenet_mnist(mnist_train):
    """A LeNet trained briefly on all ten digits (seed 0)."""
    return train_lenet(mnist_train, seed=0)


@pytest.fixture(scope="session")
def lenet_halves(data_dir):
    """Two LeNets: digits 0-4 (seed 1) and digits 5-9 (seed 2), with their
    training data."""
    out = []
    for digits, seed in (([str(i) for i in range(5)], 1), ([str(i) for i in range(5, 10)], 2)):
        data = load_image_folder(
            data_dir / "mnist-train.tar.gz", MNIST_SPEC, classes=digits, progress=False
        )
        out.append((train_lenet(data, seed=seed, epochs=3), data))
    return out
