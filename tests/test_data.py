"""lego_core.data: loading ImageFolder sources, refusing hostile archives, caching."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lego_core.data import (
    ArchiveLimits,
    ImageFolderData,
    inspect_image_folder,
    load_image_folder,
    shared_data_dir,
)
from lego_core.errors import DatasetError, UnknownClassError
from lego_core.spec import CIFAR10_SPEC, MNIST_SPEC, InputSpec

# Per-class image counts of the official MNIST test set.
MNIST_TEST_COUNTS = {
    "0": 980, "1": 1135, "2": 1032, "3": 1010, "4": 982,
    "5": 892, "6": 958, "7": 1028, "8": 974, "9": 1009,
}  # fmt: skip


def shared_archive(name: str) -> Path:
    path = shared_data_dir() / name
    assert path.is_file(), f"{path} is missing; set LEGO_DATA_DIR to the shared data folder"
    return path


def png_bytes(value: int, size: tuple[int, int] = (8, 8), mode: str = "L") -> bytes:
    color = value if mode == "L" else (value, 255 - value, value // 2)
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_tar(path: Path, files: dict[str, bytes], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data in files.items():
            add_file(tar, name, data)
    return path


def make_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


SMALL_SET = {
    "cat/a.png": png_bytes(10),
    "cat/b.png": png_bytes(20),
    "dog/a.png": png_bytes(200),
    "README.md": b"not an image, ignored at the top level",
}
SPEC_8 = InputSpec(1, 8, 8, (0.5,), (0.25,))


def tree_snapshot(root: Path) -> set[Path]:
    return set(root.rglob("*"))


# --------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def mnist_subset(tmp_path_factory) -> ImageFolderData:
    cache = tmp_path_factory.mktemp("cache")
    return load_image_folder(
        shared_archive("mnist-test.tar.gz"), MNIST_SPEC, classes=["7", "3"], cache_dir=cache
    )


def test_mnist_class_subset_shapes_labels_and_counts(mnist_subset):
    data = mnist_subset
    assert data.class_names == ["7", "3"]  # requested order, not sorted order
    assert data.images.dtype == torch.uint8
    assert data.images.shape == (1028 + 1010, 1, 28, 28)
    assert data.labels.dtype == torch.int64
    assert data.counts() == {"7": 1028, "3": 1010}
    # Grouped by class in class index order.
    assert data.labels[:1028].eq(0).all() and data.labels[1028:].eq(1).all()
    assert len(data) == 2038
    assert data.source.endswith("mnist-test.tar.gz")


def test_batches_normalise_per_spec(mnist_subset):
    data = mnist_subset
    images, labels = next(data.batches(100, MNIST_SPEC))
    assert images.shape == (100, 1, 28, 28) and images.dtype == torch.float32
    expected = (data.images[:100].float() / 255 - 0.1307) / 0.3081
    assert torch.allclose(images, expected)
    assert torch.equal(labels, data.labels[:100])
    sizes = [len(labels) for _, labels in data.batches(1000, MNIST_SPEC)]
    assert sizes == [1000, 1000, 38]
    raw, _ = next(data.raw_batches(10))
    assert raw.min() >= 0 and raw.max() <= 1
    with pytest.raises(DatasetError, match="spec expects 3x32x32"):
        next(data.batches(10, CIFAR10_SPEC))


def test_subset_keeps_classes(mnist_subset):
    part = mnist_subset.subset([0, 1, 2000])
    assert part.class_names == ["7", "3"]
    assert part.labels.tolist() == [0, 0, 1]
    assert part.counts() == {"7": 2, "3": 1}
    threes = mnist_subset.subset(mnist_subset.labels == 1)
    assert threes.counts() == {"7": 0, "3": 1010}


def test_inspect_counts_the_whole_archive():
    assert inspect_image_folder(shared_archive("mnist-test.tar.gz")) == MNIST_TEST_COUNTS


def test_cifar_per_class_limit_and_resize(tmp_path):
    spec = InputSpec(3, 20, 24, (0.5,) * 3, (0.25,) * 3)
    data = load_image_folder(
        shared_archive("cifar10-test.tar.gz"), spec, per_class_limit=3, cache_dir=tmp_path
    )
    assert data.class_names[0] == "airplane" and data.class_names[-1] == "truck"
    assert data.images.shape == (30, 3, 20, 24)
    assert set(data.counts().values()) == {3}


def test_unknown_class_names_are_named():
    with pytest.raises(UnknownClassError, match="'eleven'"):
        load_image_folder(
            shared_archive("mnist-test.tar.gz"), MNIST_SPEC, classes=["1", "eleven"], cache=False
        )


def test_cache_hit_returns_identical_tensors(tmp_path):
    archive = make_tar(tmp_path / "set.tar.gz", SMALL_SET)
    cache = tmp_path / "cache"
    first = load_image_folder(archive, SPEC_8, cache_dir=cache)
    cached = list((cache / "datasets").glob("*.pt"))
    assert len(cached) == 1
    # Replace the cache content's source: a hit must come from the cache file.
    blob = torch.load(cached[0], weights_only=True)
    blob["source"] = "from-cache"
    torch.save(blob, cached[0])
    second = load_image_folder(archive, SPEC_8, cache_dir=cache)
    assert second.source == "from-cache"
    assert torch.equal(first.images, second.images)
    assert torch.equal(first.labels, second.labels)
    assert first.class_names == second.class_names
    # Another class subset or spec is another cache entry.
    load_image_folder(archive, SPEC_8, classes=["dog"], cache_dir=cache)
    assert len(list((cache / "datasets").glob("*.pt"))) == 2
    assert not list((cache / "datasets").glob("*.tmp"))


def test_damaged_cache_is_rebuilt(tmp_path):
    archive = make_tar(tmp_path / "set.tar.gz", SMALL_SET)
    cache = tmp_path / "cache"
    first = load_image_folder(archive, SPEC_8, cache_dir=cache)
    (cache_file,) = (cache / "datasets").glob("*.pt")
    cache_file.write_bytes(b"garbage")
    again = load_image_folder(archive, SPEC_8, cache_dir=cache)
    assert torch.equal(first.images, again.images)


# --------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("kind", ["tar", "tar.gz", "tgz", "zip"])
def test_archive_formats(tmp_path, kind):
    path = tmp_path / f"set.{kind}"
    if kind == "zip":
        make_zip(path, SMALL_SET)
    else:
        make_tar(path, SMALL_SET, mode="w" if kind == "tar" else "w:gz")
    data = load_image_folder(path, SPEC_8, cache=False)
    assert data.class_names == ["cat", "dog"]
    assert data.labels.tolist() == [0, 0, 1]
    # Within a class, images come in path order: cat/a (10) before cat/b (20).
    assert data.images[:, 0, 0, 0].tolist() == [10, 20, 200]
    assert inspect_image_folder(path) == {"cat": 2, "dog": 1}


def test_directory_source_with_top_folder_and_conversion(tmp_path):
    root = tmp_path / "data" / "train"
    for name, data in SMALL_SET.items():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    (root / "cat" / ".DS_Store").write_bytes(b"\0\1")  # OS clutter is ignored
    (root / "dog" / "big.png").write_bytes(png_bytes(50, size=(16, 12), mode="RGB"))
    data = load_image_folder(tmp_path / "data", CIFAR10_SPEC)  # descends into train/
    assert data.class_names == ["cat", "dog"]
    assert data.images.shape == (4, 3, 32, 32)  # gray -> RGB, 8x8 and 16x12 -> 32x32
    assert data.counts() == {"cat": 2, "dog": 2}
    assert inspect_image_folder(tmp_path / "data") == {"cat": 2, "dog": 2}


def test_directory_empty_class_folder_is_named(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "a.png").write_bytes(png_bytes(1))
    (tmp_path / "dog").mkdir()
    with pytest.raises(DatasetError, match="class folder 'dog' has no images"):
        load_image_folder(tmp_path, SPEC_8)


def test_class_order_follows_request(tmp_path):
    archive = make_zip(tmp_path / "set.zip", SMALL_SET)
    data = load_image_folder(archive, SPEC_8, classes=["dog", "cat"], cache=False)
    assert data.class_names == ["dog", "cat"]
    assert data.labels.tolist() == [0, 1, 1]
    assert data.images[:, 0, 0, 0].tolist() == [200, 10, 20]


def test_per_class_limit_keeps_first_paths_whatever_the_archive_order(tmp_path):
    files = {f"cat/{i:02d}.png": png_bytes(i) for i in reversed(range(12))}
    archive = make_tar(tmp_path / "set.tar", files, mode="w")
    data = load_image_folder(archive, SPEC_8, per_class_limit=4, cache=False)
    assert data.images[:, 0, 0, 0].tolist() == [0, 1, 2, 3]


# --------------------------------------------------------------------------- refusals


def assert_refused(path: Path, match: str, limits: ArchiveLimits = ArchiveLimits()) -> None:
    before = tree_snapshot(path.parent)
    for call in (
        lambda: load_image_folder(path, SPEC_8, limits=limits, cache_dir=path.parent / "cache"),
        lambda: inspect_image_folder(path, limits=limits),
    ):
        with pytest.raises(DatasetError, match=match) as info:
            call()
        assert "\n" not in str(info.value)
    assert tree_snapshot(path.parent) == before  # no cache, no extracted member


def test_refuses_parent_directory_member(tmp_path):
    archive = make_tar(
        tmp_path / "evil.tar.gz", {"cat/a.png": png_bytes(1), "../escaped.png": png_bytes(2)}
    )
    assert_refused(archive, r"'\.\./escaped\.png' has a '\.\.' path component")
    assert not (tmp_path.parent / "escaped.png").exists()


def test_refuses_windows_style_parent_member(tmp_path):
    archive = make_zip(
        tmp_path / "evil.zip", {"cat/a.png": png_bytes(1), "cat\\..\\..\\x.png": png_bytes(2)}
    )
    assert_refused(archive, r"'\.\.' path component")


def test_refuses_absolute_member(tmp_path):
    target = f"/tmp/lego-absolute-{tmp_path.name}.png"
    archive = make_zip(tmp_path / "evil.zip", {"cat/a.png": png_bytes(1), target: png_bytes(2)})
    assert_refused(archive, "has an absolute path")
    assert not Path(target).exists()


def test_refuses_symlink_member(tmp_path):
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        add_file(tar, "cat/a.png", png_bytes(1))
        link = tarfile.TarInfo("cat/passwd.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    assert_refused(path, "'cat/passwd.png' is a link")


def test_refuses_zip_symlink_member(tmp_path):
    path = tmp_path / "evil.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("cat/a.png", png_bytes(1))
        info = zipfile.ZipInfo("cat/link.png")
        info.external_attr = 0o120777 << 16  # S_IFLNK
        zf.writestr(info, "/etc/passwd")
    assert_refused(path, "'cat/link.png' is a link")


def test_refuses_hardlink_member(tmp_path):
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        add_file(tar, "cat/a.png", png_bytes(1))
        link = tarfile.TarInfo("cat/b.png")
        link.type, link.linkname = tarfile.LNKTYPE, "cat/a.png"
        tar.addfile(link)
    assert_refused(path, "'cat/b.png' is a link")


def test_refuses_device_member(tmp_path):
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        add_file(tar, "cat/a.png", png_bytes(1))
        device = tarfile.TarInfo("cat/null.png")
        device.type = tarfile.CHRTYPE
        tar.addfile(device)
    assert_refused(path, "not a regular file")


def test_refuses_too_many_members(tmp_path):
    files = {f"cat/{i}.png": png_bytes(i) for i in range(11)}
    limits = ArchiveLimits(max_members=10)
    assert_refused(make_tar(tmp_path / "many.tar.gz", files), "more than 10 members", limits)
    assert_refused(make_zip(tmp_path / "many.zip", files), "more than 10 members", limits)


def test_refuses_zip_bomb_member(tmp_path):
    archive = make_zip(
        tmp_path / "bomb.zip", {"cat/a.png": png_bytes(1), "cat/bomb.png": bytes(20 << 20)}
    )
    assert archive.stat().st_size < 100_000
    assert_refused(archive, "compresses .* over the 100:1 limit; refusing a possible zip bomb")


def test_refuses_tar_over_total_size(tmp_path):
    # 12 MiB of zeros; not named as images so that no decode error comes first.
    files = {f"cat/{i}.raw": bytes(3 << 20) for i in range(4)}
    archive = make_tar(tmp_path / "bomb.tar.gz", files)
    assert archive.stat().st_size < 100_000
    limits = ArchiveLimits(max_total_bytes=10 << 20)
    assert_refused(archive, r"more than 10485760 bytes uncompressed", limits)


def test_refuses_tar_whose_headers_unpack_too_far(tmp_path):
    # A 3 MiB pax header: tarfile reads headers itself, so only the stream cap sees it.
    path = tmp_path / "pax.tar.gz"
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("cat/a.png")
        info.size = 3
        info.pax_headers = {"comment": "x" * (3 << 20)}
        tar.addfile(info, io.BytesIO(b"abc"))
    limits = ArchiveLimits(max_total_bytes=1 << 20, max_members=10)
    assert_refused(path, "unpacks to more than", limits)


def test_refuses_oversized_member(tmp_path):
    archive = make_tar(tmp_path / "big.tar.gz", {"cat/a.png": bytes(2 << 20)})
    assert_refused(archive, "over the 1048576-byte limit", ArchiveLimits(max_member_bytes=1 << 20))


def test_refuses_image_over_pixel_limit(tmp_path):
    archive = make_zip(tmp_path / "huge.zip", {"cat/a.png": png_bytes(1, size=(200, 200))})
    assert_refused(
        archive, "200x200 pixels, over the 10000-pixel limit", ArchiveLimits(max_pixels=10_000)
    )


def test_refuses_pillow_decompression_bomb(tmp_path):
    # A PNG header claiming 20000x20000 pixels: over Pillow's own bomb threshold.
    big = io.BytesIO()
    Image.new("1", (20000, 20000)).save(big, format="PNG")
    archive = make_zip(tmp_path / "bomb.zip", {"cat/a.png": big.getvalue()})
    # Our limit is raised out of the way, so Pillow's own check is the one that fires.
    assert_refused(
        archive, "'cat/a.png' is too large to decode safely", ArchiveLimits(max_pixels=10**12)
    )


def test_refuses_duplicate_members(tmp_path):
    path = tmp_path / "twice.tar"
    with tarfile.open(path, "w") as tar:
        add_file(tar, "cat/a.png", png_bytes(1))
        add_file(tar, "cat/a.png", png_bytes(2))
    assert_refused(path, "'cat/a.png' appears more than once")


def test_refuses_non_image_in_class_folder(tmp_path):
    archive = make_tar(
        tmp_path / "mixed.tar.gz", {"cat/a.png": png_bytes(1), "cat/notes.txt": b"hello"}
    )
    assert_refused(archive, "'cat/notes.txt' in class folder 'cat' is not an image")


def test_refuses_undecodable_image_naming_it(tmp_path):
    archive = make_zip(
        tmp_path / "broken.zip",
        {"cat/a.png": png_bytes(1), "cat/broken.png": b"\x89PNG not really"},
    )
    assert_refused(archive, "'cat/broken.png' is not a decodable image")


def test_refuses_truncated_image(tmp_path):
    good = png_bytes(1, size=(64, 64), mode="RGB")
    noisy = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        noisy, format="PNG"
    )
    archive = make_zip(
        tmp_path / "cut.zip", {"cat/a.png": good, "cat/cut.png": noisy.getvalue()[:-200]}
    )
    assert_refused(archive, "'cat/cut.png' is not a decodable image")


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_refuses_empty_archive(tmp_path, kind):
    path = tmp_path / f"empty.{kind}"
    if kind == "zip":
        make_zip(path, {})
    else:
        make_tar(path, {})
    assert_refused(path, "no class folders with images")


def test_refuses_archive_with_only_clutter(tmp_path):
    archive = make_zip(tmp_path / "clutter.zip", {"README": b"x", ".DS_Store": b"y"})
    assert_refused(archive, "no class folders with images")


def test_refuses_images_outside_class_folders(tmp_path):
    archive = make_zip(tmp_path / "flat.zip", {"a.png": png_bytes(1), "cat/b.png": png_bytes(2)})
    assert_refused(archive, "'a.png' is not inside a class folder")


def test_refuses_nesting_below_class_folders(tmp_path):
    archive = make_zip(
        tmp_path / "deep.zip", {"train/cat/a.png": png_bytes(1), "test/cat/b.png": png_bytes(2)}
    )
    assert_refused(archive, "nested too deep")


def test_refuses_files_that_are_not_archives(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(b"just some bytes" * 100)
    assert_refused(path, "not a directory or a .tar, .tar.gz/.tgz or .zip archive")
    corrupt = tmp_path / "corrupt.tar.gz"
    corrupt.write_bytes(b"\x1f\x8b" + b"\x00" * 100)
    assert_refused(corrupt, "not a readable tar archive")


def test_missing_source(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_image_folder(tmp_path / "nope.tar.gz", SPEC_8)


def test_request_validation(tmp_path):
    archive = make_zip(tmp_path / "set.zip", SMALL_SET)
    with pytest.raises(DatasetError, match="more than once"):
        load_image_folder(archive, SPEC_8, classes=["cat", "cat"])
    with pytest.raises(DatasetError, match="per_class_limit"):
        load_image_folder(archive, SPEC_8, per_class_limit=0)


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    # A 16-bit PNG of mid grey: Pillow's own convert("L") would clip it to white.
    for name, value16 in {"dark": 20 * 257, "mid": 128 * 257}.items():
        (tmp_path / name).mkdir()
        buffer = io.BytesIO()
        Image.fromarray(np.full((8, 8), value16, dtype=np.uint16)).save(buffer, format="PNG")
        (tmp_path / name / "a.png").write_bytes(buffer.getvalue())
    data = load_image_folder(tmp_path, MNIST_SPEC)
    assert data.class_names == ["dark", "mid"]
    assert data.images[:, 0, 0, 0].tolist() == [20, 128]
