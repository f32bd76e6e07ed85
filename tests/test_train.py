"""lego_core.train: a seeded LeNet run on real MNIST learns, and repeats exactly."""

from __future__ import annotations

import pytest
import torch

from lego_core.architectures import build_model
from lego_core.data import ImageFolderData, load_image_folder, shared_data_dir
from lego_core.errors import DatasetError
from lego_core.spec import CIFAR10_SPEC, MNIST_SPEC
from lego_core.train import _augment, accuracy, train


@pytest.fixture(autouse=True)
def one_thread():
    # These models are too small to gain from a second thread, and OpenMP threads
    # slow down ten-fold when a shared 2-core CI machine is busy with other work.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def mnist(tmp_path_factory) -> dict[str, ImageFolderData]:
    cache = tmp_path_factory.mktemp("cache")
    splits = {}
    for split in ("train", "test"):
        path = shared_data_dir() / f"mnist-{split}.tar.gz"
        assert path.is_file(), f"{path} is missing; set LEGO_DATA_DIR to the shared data folder"
        splits[split] = load_image_folder(path, MNIST_SPEC, cache_dir=cache, progress=False)
    return splits


@pytest.mark.slow
def test_lenet_learns_mnist_in_one_epoch(mnist):
    torch.manual_seed(0)
    model = build_model("lenet", 10, MNIST_SPEC)
    trained = train(model, mnist["train"], MNIST_SPEC, epochs=1, seed=0, progress=False)
    assert trained is model and not model.training
    assert accuracy(model, mnist["test"], MNIST_SPEC) >= 0.97


def test_same_seed_gives_identical_weights(mnist):
    small = mnist["train"].subset(torch.arange(0, 60_000, 60))  # 1,000 images

    def run(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = build_model("plain_cnn", 10, MNIST_SPEC)  # has dropout and BatchNorm
        train(model, small, MNIST_SPEC, batch_size=64, seed=seed, progress=False)
        return model.state_dict()

    first, second, other = run(0), run(0), run(1)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_augment_crops_and_flips_within_bounds():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out = _augment(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert not torch.equal(out, images)
    # Every output is a shifted (and maybe mirrored) window of its own padded input.
    padded = torch.nn.functional.pad(images, (4,) * 4)
    for i in range(8):
        windows = [padded[i, :, r : r + 32, c : c + 32] for r in range(9) for c in range(9)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(2)) for w in windows)


def test_train_with_augmentation_runs_on_rgb():
    data = ImageFolderData(
        torch.randint(0, 256, (33, 3, 32, 32), dtype=torch.uint8),
        torch.randint(0, 3, (33,)),
        ["a", "b", "c"],
    )
    model = build_model("plain_cnn", 3, CIFAR10_SPEC)
    # 33 images at batch 16 leave a last batch of one, which BatchNorm cannot train on.
    train(model, data, CIFAR10_SPEC, epochs=2, batch_size=16, augment=True, progress=False)
    assert 0.0 <= accuracy(model, data, CIFAR10_SPEC) <= 1.0


def test_empty_data_is_refused():
    empty = ImageFolderData(
        torch.zeros((0, 1, 28, 28), dtype=torch.uint8), torch.zeros(0, dtype=torch.int64), ["x"]
    )
    model = build_model("lenet", 1, MNIST_SPEC)
    with pytest.raises(DatasetError, match="empty"):
        train(model, empty, MNIST_SPEC)
    with pytest.raises(DatasetError, match="empty"):
        accuracy(model, empty, MNIST_SPEC)
