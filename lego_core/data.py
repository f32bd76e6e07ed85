"""Image-classification data in the ImageFolder layout, from a directory or an archive.

A dataset is laid out `<class>/<image>`, optionally under one top folder
(`train/<class>/<image>`, as the shared archives unpack). Sources are a directory
or a `.tar`, `.tar.gz`/`.tgz` or `.zip` archive.

The service reads *uploaded* archives with this code, so archives are read member
by member in memory and never extracted to disk; unsafe members (absolute paths,
`..`, links, devices), oversized members, too many members, compression bombs and
undecodable images are refused with a one-line `DatasetError`.

Label order: `class_names` is the requested `classes` list, in the order given,
when `classes` is passed, else the sorted class folder names (the standard
MNIST/CIFAR-10 order). A label is always the index into the returned
`class_names`, so a subset `["7", "3"]` has labels 0 (= "7") and 1 (= "3").
Within a class, images are ordered by their path, whatever the archive order.
"""

from __future__ import annotations

import bisect
import gzip
import hashlib
import io
import json
import logging
import os
import stat
import sys
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from lego_core.errors import DatasetError, UnknownClassError
from lego_core.files import atomic_write
from lego_core.spec import InputSpec

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
# Only these Pillow decoders may run on uploaded bytes: some other plugins (EPS)
# hand the data to external programs.
_PIL_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF", "PPM")
# Members below this size cannot be a meaningful bomb, and tiny flat images
# (e.g. an all-black BMP) legitimately compress very well.
_RATIO_CHECK_MIN_BYTES = 1 << 20
# tar header + padding per member, used to cap the decompressed tar stream.
_TAR_OVERHEAD_PER_MEMBER = 3 * 512
_IGNORED_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})
_CACHE_FORMAT = 1


@dataclass(frozen=True)
class ArchiveLimits:
    """Bounds on what a dataset source may contain; defaults fit the shared data."""

    max_members: int = 200_000
    max_total_bytes: int = 2 << 30
    max_member_bytes: int = 32 << 20
    max_pixels: int = 25_000_000
    max_ratio: float = 100.0


@dataclass(eq=False)  # tensors have no boolean equality
class ImageFolderData:
    """Decoded images of one spec with their labels.

    `images` is uint8 N x C x H x W, `labels` int64 N with values indexing
    `class_names`.
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    source: str = ""

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DatasetError("images must be a uint8 tensor of shape N x C x H x W")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise DatasetError("labels must be an int64 tensor with one label per image")
        if len(self.labels) and (
            int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.class_names)
        ):
            raise DatasetError("labels must index class_names")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """C x H x W of every image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def counts(self) -> dict[str, int]:
        """Images per class, in class index order (classes without images count 0)."""
        per_class = torch.bincount(self.labels, minlength=len(self.class_names)).tolist()
        return dict(zip(self.class_names, per_class, strict=True))

    def subset(self, indices: Sequence[int] | torch.Tensor) -> ImageFolderData:
        """The images at `indices`, keeping class names and labels."""
        index = torch.as_tensor(indices)
        index = index.nonzero().flatten() if index.dtype == torch.bool else index.long()
        return ImageFolderData(
            self.images[index], self.labels[index], list(self.class_names), self.source
        )

    def batches(
        self, batch_size: int, spec: InputSpec, device: torch.device | str | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (normalised float images, labels) in order, `batch_size` at a time."""
        self.check_spec(spec)
        for start in range(0, len(self), batch_size):
            images = self.images[start : start + batch_size]
            labels = self.labels[start : start + batch_size]
            if device is not None:
                images, labels = images.to(device), labels.to(device)
            yield normalize(images, spec), labels

    def raw_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (float images in [0, 1], labels) in order, `batch_size` at a time."""
        for start in range(0, len(self), batch_size):
            images = self.images[start : start + batch_size].float().div_(255.0)
            yield images, self.labels[start : start + batch_size]

    def check_spec(self, spec: InputSpec) -> None:
        """Raise DatasetError unless the images have `spec`'s C x H x W."""
        if self.shape != spec.shape:
            raise DatasetError(
                "data images are {}x{}x{} but the spec expects {}x{}x{}".format(
                    *self.shape, *spec.shape
                )
            )


def normalize(images: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """uint8 (or [0, 1] float) N x C x H x W images -> `(x / 255 - mean) / std` floats."""
    x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
    mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def shared_data_dir() -> Path:
    """Directory of the shared archives: `$LEGO_DATA_DIR`, else `<repo>/../shared/data`."""
    env = os.environ.get("LEGO_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def default_cache_dir() -> Path:
    """`$LEGO_CACHE_DIR`, else `~/.cache/model-lego`."""
    env = os.environ.get("LEGO_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "model-lego"


def load_image_folder(
    source: str | os.PathLike,
    spec: InputSpec,
    classes: Sequence[str] | None = None,
    per_class_limit: int | None = None,
    limits: ArchiveLimits = ArchiveLimits(),
    *,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> ImageFolderData:
    """Decode an ImageFolder directory or archive into tensors of `spec`'s shape.

    Images are converted to L or RGB and resized (bilinear) to spec height x width.
    `classes` selects class folders by name; labels index the returned
    `class_names` (see the module docstring). `per_class_limit` keeps the first
    images of each class in path order. Archives (not directories, whose contents
    can change without their mtime changing) are cached as decoded tensors under
    `cache_dir`.
    """
    path = Path(source)
    wanted = _check_request(classes, per_class_limit)
    if not path.exists():
        raise DatasetError(f"dataset '{source}' does not exist")

    cache_file = None
    if cache and path.is_file():
        cache_file = _cache_path(path, spec, wanted, per_class_limit, limits, cache_dir)
        cached = _read_cache(cache_file)
        if cached is not None:
            return cached

    scan = _Scan(
        spec=spec,
        wanted=set(wanted) if wanted is not None else None,
        per_class_limit=per_class_limit,
        limits=limits,
    )
    _run_scan(path, scan, progress, desc=f"decoding {path.name}")
    found = scan.classes()

    if wanted is not None:
        unknown = [c for c in wanted if c not in found]
        if unknown:
            raise UnknownClassError(
                f"unknown class{'es' if len(unknown) > 1 else ''} "
                f"{_quoted(unknown)} in '{path.name}'; it has {_quoted(sorted(found))}"
            )
        class_names = list(wanted)
    else:
        class_names = sorted(found)

    arrays: list[np.ndarray] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        kept = scan.kept[name]
        for member in kept.keys:
            arrays.append(kept.arrays[member])
        labels.extend([label] * len(kept.keys))
    images = (
        torch.from_numpy(np.stack(arrays))
        if arrays
        else torch.zeros((0, *spec.shape), dtype=torch.uint8)
    )
    data = ImageFolderData(images, torch.tensor(labels, dtype=torch.int64), class_names, str(path))
    if cache_file is not None:
        _write_cache(cache_file, data)
    return data


def inspect_image_folder(
    source: str | os.PathLike,
    limits: ArchiveLimits = ArchiveLimits(),
    *,
    progress: bool = False,
) -> dict[str, int]:
    """Validate a dataset like `load_image_folder` (decoding every image) and count
    images per class, in sorted class order."""
    path = Path(source)
    if not path.exists():
        raise DatasetError(f"dataset '{source}' does not exist")
    scan = _Scan(spec=None, wanted=None, per_class_limit=None, limits=limits)
    _run_scan(path, scan, progress, desc=f"checking {path.name}")
    found = scan.classes()
    return {name: found[name] for name in sorted(found)}


# --------------------------------------------------------------------------- scanning


@dataclass
class _Member:
    """One file or folder of a source, with its name already checked to be safe."""

    name: str  # as in the source, for messages
    parts: tuple[str, ...]
    is_dir: bool
    read: Callable[[], bytes] | None = None  # tar streams: valid only while current


@dataclass
class _Kept:
    """The images of one class that are kept so far, sorted by member path."""

    keys: list[str] = field(default_factory=list)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class _Scan:
    """Collects a source's members, decoding the images that will be kept.

    Decoding happens while streaming (a tar cannot be rewound); the layout is
    judged once every member has been seen. In a valid layout an image's class
    is its parent folder, which is what decides whether to decode it.
    """

    spec: InputSpec | None  # None: decode only to verify
    wanted: set[str] | None
    per_class_limit: int | None
    limits: ArchiveLimits
    files: list[tuple[str, ...]] = field(default_factory=list)
    names: dict[tuple[str, ...], str] = field(default_factory=dict)
    dirs: set[tuple[str, ...]] = field(default_factory=set)
    kept: dict[str, _Kept] = field(default_factory=dict)
    image_counts: dict[tuple[str, ...], int] = field(default_factory=dict)
    _class_counts: dict[str, int] | None = None

    def add(self, member: _Member) -> None:
        if any(p.startswith(".") or p in _IGNORED_NAMES for p in member.parts):
            return  # .DS_Store, ._AppleDouble, __MACOSX/: editor and OS clutter
        if member.is_dir:
            self.dirs.add(member.parts)
            return
        if member.parts in self.names:
            raise DatasetError(f"member '{member.name}' appears more than once")
        self.files.append(member.parts)
        self.names[member.parts] = member.name
        if not _is_image_name(member.parts[-1]) or len(member.parts) not in (2, 3):
            return  # judged by the layout check once every member is known
        cls = member.parts[-2]
        if self.wanted is not None and cls not in self.wanted:
            return
        kept = self.kept.setdefault(cls, _Kept())
        key = "/".join(member.parts)
        if self.per_class_limit is not None and len(kept.keys) >= self.per_class_limit:
            if key >= kept.keys[-1]:
                return
            evicted = kept.keys.pop()
            kept.arrays.pop(evicted, None)
        assert member.read is not None
        array = _decode_image(member.read(), member.name, self.spec, self.limits)
        bisect.insort(kept.keys, key)
        if array is not None:
            kept.arrays[key] = array

    def classes(self) -> dict[str, int]:
        """Check the layout; return {class folder: image count} and trim `kept` to it."""
        if self._class_counts is None:
            self._class_counts = self._check_layout()
        return self._class_counts

    def _check_layout(self) -> dict[str, int]:
        images = [p for p in self.files if _is_image_name(p[-1])]
        tops = {p[0] for p in self.files if len(p) >= 2} | {d[0] for d in self.dirs}
        # One top folder whose subfolders hold the images: descend into it.
        strip = 1 if len(tops) == 1 and any(len(p) >= 3 for p in images) else 0

        counts: dict[str, int] = {}
        for parts in self.files:
            rel = parts[strip:]
            is_image = _is_image_name(parts[-1])
            name = self.names[parts]
            if len(rel) <= 1:
                if is_image:
                    raise DatasetError(
                        f"image '{name}' is not inside a class folder; expected <class>/<image>"
                    )
                continue  # README, LICENSE, ... beside the class folders
            if len(rel) > 2:
                raise DatasetError(f"'{name}' is nested too deep; expected <class>/<image>")
            if not is_image:
                raise DatasetError(
                    f"'{name}' in class folder '{rel[0]}' is not an image; expected one of "
                    + ", ".join(sorted(IMAGE_EXTENSIONS))
                )
            counts[rel[0]] = counts.get(rel[0], 0) + 1
        for parts in sorted(self.dirs):
            rel = parts[strip:]
            if len(rel) > 1:
                raise DatasetError(
                    f"unexpected folder '{'/'.join(parts)}' inside class folder '{rel[0]}'; "
                    "expected <class>/<image>"
                )
            if len(rel) == 1 and rel[0] not in counts:
                raise DatasetError(f"class folder '{'/'.join(parts)}' has no images")
        if not counts:
            raise DatasetError(
                "no class folders with images found; expected <class>/<image>, "
                "optionally under one top folder"
            )
        return counts


def _run_scan(path: Path, scan: _Scan, progress: bool, desc: str) -> None:
    if path.is_dir():
        members, total = _iter_directory(path, scan.limits), None
    else:
        members, total = _open_archive(path, scan.limits)
    show = progress and sys.stderr.isatty()
    with tqdm(members, total=total, desc=desc, unit="file", disable=not show, leave=False) as bar:
        for member in bar:
            scan.add(member)


def _open_archive(path: Path, limits: ArchiveLimits) -> tuple[Iterator[_Member], int | None]:
    with open(path, "rb") as fh:
        magic = fh.read(512 + 265)
    if magic[:2] == b"\x1f\x8b":
        return _iter_tar(path, limits, compressed=True), None
    if magic[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        try:
            with zipfile.ZipFile(path) as zf:
                total = len(zf.infolist())
        except (zipfile.BadZipFile, OSError) as exc:
            raise DatasetError(f"'{path.name}' is not a readable zip archive: {exc}") from None
        return _iter_zip(path, limits), total
    if magic[257:262] == b"ustar" or path.name.lower().endswith(".tar"):
        return _iter_tar(path, limits, compressed=False), None
    raise DatasetError(f"'{path.name}' is not a directory or a .tar, .tar.gz/.tgz or .zip archive")


def _safe_parts(name: str) -> tuple[str, ...]:
    """Path components of an archive member name; refuses names that could escape."""
    if "\x00" in name:
        raise DatasetError(f"member name {name!r} contains a NUL byte")
    # Backslashes are separators to Windows tools, so `..\\x` must count as `..`.
    normalised = name.replace("\\", "/")
    if normalised.startswith("/") or (len(normalised) > 1 and normalised[1] == ":"):
        raise DatasetError(f"member '{name}' has an absolute path")
    parts = tuple(p for p in normalised.split("/") if p not in ("", "."))
    if ".." in parts:
        raise DatasetError(f"member '{name}' has a '..' path component")
    return parts


def _iter_directory(root: Path, limits: ArchiveLimits) -> Iterator[_Member]:
    """Members of a directory, three levels deep at most (top/class/image).

    Deeper entries cannot be part of a valid layout; the folder that holds them
    shows up as an unexpected folder. A directory is the local user's own data
    (uploads arrive as archives), so symlinks in it are followed.
    """
    count = 0
    total = 0

    def walk(folder: Path, parts: tuple[str, ...]) -> Iterator[_Member]:
        nonlocal count, total
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            count += 1
            if count > limits.max_members:
                raise DatasetError(f"'{root.name}' has more than {limits.max_members} entries")
            sub = (*parts, entry.name)
            name = "/".join(sub)
            if entry.is_dir():
                yield _Member(name, sub, is_dir=True)
                hidden = entry.name.startswith(".") or entry.name in _IGNORED_NAMES
                if len(sub) < 3 and not hidden:
                    yield from walk(Path(entry.path), sub)
            elif entry.is_file():
                size = entry.stat().st_size
                _check_member_size(name, size, limits)
                total += size
                _check_total(root.name, total, limits)
                yield _Member(name, sub, is_dir=False, read=Path(entry.path).read_bytes)
            else:
                raise DatasetError(f"'{name}' is not a regular file or folder")

    yield from walk(root, ())


class _CappedReader(io.RawIOBase):
    """A read-only stream that fails once more than `cap` bytes have been read.

    It bounds everything tarfile reads from a (decompressed) tar, headers and
    long-name/pax records included, whatever the members claim.
    """

    def __init__(self, inner: io.BufferedIOBase, cap: int, label: str) -> None:
        self._inner, self._cap, self._label, self._read = inner, cap, label, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        limit = self._cap - self._read + 1
        data = self._inner.read(limit if size is None or size < 0 else min(size, limit))
        self._read += len(data)
        if self._read > self._cap:
            raise DatasetError(
                f"'{self._label}' unpacks to more than {self._cap} bytes; refusing it"
            )
        return data

    def readinto(self, buffer) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _iter_tar(path: Path, limits: ArchiveLimits, compressed: bool) -> Iterator[_Member]:
    cap = limits.max_total_bytes + (limits.max_members + 2) * _TAR_OVERHEAD_PER_MEMBER
    count = 0
    total = 0
    try:
        with open(path, "rb") as raw:
            stream = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw
            capped = _CappedReader(stream, cap, path.name)  # type: ignore[arg-type]
            # "r|": strictly sequential reads of the stream, nothing extracted.
            with tarfile.open(fileobj=capped, mode="r|") as tf:
                for info in tf:
                    count += 1
                    if count > limits.max_members:
                        raise DatasetError(
                            f"'{path.name}' has more than {limits.max_members} members"
                        )
                    parts = _safe_parts(info.name)
                    if info.isdir():
                        if parts:
                            yield _Member(info.name, parts, is_dir=True)
                        continue
                    if info.issym() or info.islnk():
                        raise DatasetError(f"member '{info.name}' is a link; links are not allowed")
                    if not info.isreg():
                        raise DatasetError(f"member '{info.name}' is not a regular file or folder")
                    _check_member_size(info.name, info.size, limits)
                    total += info.size
                    _check_total(path.name, total, limits)
                    if not parts:
                        raise DatasetError(f"member {info.name!r} has an empty name")

                    def read(info: tarfile.TarInfo = info) -> bytes:
                        handle = tf.extractfile(info)
                        assert handle is not None
                        return handle.read()

                    yield _Member(info.name, parts, is_dir=False, read=read)
    except DatasetError:
        raise
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        if count == 0 and isinstance(exc, tarfile.ReadError) and "empty" in str(exc):
            return  # an empty stream holds no classes; the layout check says so
        raise DatasetError(f"'{path.name}' is not a readable tar archive: {exc}") from None


def _iter_zip(path: Path, limits: ArchiveLimits) -> Iterator[_Member]:
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            if len(infos) > limits.max_members:
                raise DatasetError(f"'{path.name}' has more than {limits.max_members} members")
            _check_total(path.name, sum(i.file_size for i in infos), limits)
            for info in infos:
                parts = _safe_parts(info.filename)
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    raise DatasetError(f"member '{info.filename}' is a link; links are not allowed")
                if info.is_dir():
                    if parts:
                        yield _Member(info.filename, parts, is_dir=True)
                    continue
                if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
                    raise DatasetError(f"member '{info.filename}' is not a regular file or folder")
                if info.flag_bits & 0x1:
                    raise DatasetError(f"member '{info.filename}' is encrypted")
                _check_member_size(info.filename, info.file_size, limits)
                ratio = info.file_size / max(info.compress_size, 1)
                if info.file_size >= _RATIO_CHECK_MIN_BYTES and ratio > limits.max_ratio:
                    raise DatasetError(
                        f"member '{info.filename}' compresses {ratio:.0f}:1, over the "
                        f"{limits.max_ratio:g}:1 limit; refusing a possible zip bomb"
                    )
                if not parts:
                    raise DatasetError(f"member {info.filename!r} has an empty name")

                def read(info: zipfile.ZipInfo = info) -> bytes:
                    with zf.open(info) as handle:
                        # The header's size bounds the output, but never trust it alone.
                        data = handle.read(limits.max_member_bytes + 1)
                    _check_member_size(info.filename, len(data), limits)
                    return data

                yield _Member(info.filename, parts, is_dir=False, read=read)
    except DatasetError:
        raise
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        NotImplementedError,
        RuntimeError,
        EOFError,
        OSError,
        zlib.error,
    ) as exc:
        raise DatasetError(f"'{path.name}' is not a readable zip archive: {exc}") from None


def _check_member_size(name: str, size: int, limits: ArchiveLimits) -> None:
    if size > limits.max_member_bytes:
        raise DatasetError(
            f"member '{name}' is {size} bytes, over the {limits.max_member_bytes}-byte limit"
        )


def _check_total(label: str, total: int, limits: ArchiveLimits) -> None:
    if total > limits.max_total_bytes:
        raise DatasetError(
            f"'{label}' holds more than {limits.max_total_bytes} bytes uncompressed; refusing it"
        )


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _decode_image(
    data: bytes, name: str, spec: InputSpec | None, limits: ArchiveLimits
) -> np.ndarray | None:
    """Decode one image to a C x H x W uint8 array of `spec` (None: only verify it)."""
    try:
        # Opening reads only the header, so the pixel limit is checked before any
        # pixel buffer is allocated. Pillow's global MAX_IMAGE_PIXELS is left alone:
        # our limit is the one that counts, and Pillow's error beyond twice its own
        # limit is turned into a DatasetError below.
        with Image.open(io.BytesIO(data), formats=_PIL_FORMATS) as img:
            width, height = img.size
            if width * height > limits.max_pixels:
                raise DatasetError(
                    f"image '{name}' is {width}x{height} pixels, over the "
                    f"{limits.max_pixels}-pixel limit"
                )
            img.load()
            if spec is None:
                return None
            img = to_8bit(img).convert("L" if spec.channels == 1 else "RGB")
            if img.size != (spec.width, spec.height):
                img = img.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
            array = np.asarray(img, dtype=np.uint8)
    except DatasetError:
        raise
    except Image.DecompressionBombError:
        raise DatasetError(
            f"image '{name}' is too large to decode safely (decompression bomb)"
        ) from None
    except UnidentifiedImageError:
        # Pillow's own message shows a BytesIO repr, useless to a user.
        raise DatasetError(
            f"'{name}' is not a decodable image: not in a known format ("
            + ", ".join(_PIL_FORMATS)
            + ")"
        ) from None
    except Exception as exc:  # Pillow raises many types for corrupt data
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DatasetError(f"'{name}' is not a decodable image: {reason}") from None
    # H x W (L) or H x W x 3 (RGB) -> C x H x W
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return np.ascontiguousarray(array)


def to_8bit(img: Image.Image) -> Image.Image:
    """16- and 32-bit greyscale as 8-bit, scaled. Pillow's convert("L") clips at 255,
    which would turn every non-black pixel of a 16-bit image white."""
    if img.mode not in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        return img
    a = np.asarray(img)
    if img.mode == "I" and a.size and int(a.max()) <= 255:
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    return Image.fromarray((np.clip(a, 0, 65535) >> 8).astype(np.uint8))


def _check_request(classes: Sequence[str] | None, per_class_limit: int | None) -> list[str] | None:
    if per_class_limit is not None and per_class_limit < 1:
        raise DatasetError(f"per_class_limit must be at least 1, got {per_class_limit}")
    if classes is None:
        return None
    if isinstance(classes, str):
        raise DatasetError("classes must be a list of class names, not one string")
    wanted = [str(c) for c in classes]
    if not wanted:
        raise DatasetError("classes is empty; pass None for every class")
    duplicates = sorted({c for c in wanted if wanted.count(c) > 1})
    if duplicates:
        raise DatasetError(f"classes lists {_quoted(duplicates)} more than once")
    return wanted


def _quoted(names: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


# --------------------------------------------------------------------------- cache


def _cache_path(
    path: Path,
    spec: InputSpec,
    classes: list[str] | None,
    per_class_limit: int | None,
    limits: ArchiveLimits,
    cache_dir: str | os.PathLike | None,
) -> Path:
    st = path.stat()
    key = {
        "format": _CACHE_FORMAT,
        "path": str(path.resolve()),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "spec": spec.to_dict(),
        "classes": classes,
        "per_class_limit": per_class_limit,
        # A source accepted under looser limits must not pass stricter ones via the cache.
        "limits": asdict(limits),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    stem = path.name.split(".")[0] or "data"
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "datasets" / f"{stem}-{digest}.pt"


def _read_cache(cache_file: Path) -> ImageFolderData | None:
    if not cache_file.is_file():
        return None
    try:
        blob = torch.load(cache_file, map_location="cpu", weights_only=True)
        if blob.get("format") != _CACHE_FORMAT:
            return None
        return ImageFolderData(
            blob["images"], blob["labels"], list(blob["class_names"]), str(blob["source"])
        )
    except Exception as exc:  # a damaged cache file is rebuilt, never fatal
        log.warning("ignoring unreadable dataset cache %s: %s", cache_file, exc)
        return None


def _write_cache(cache_file: Path, data: ImageFolderData) -> None:
    blob = {
        "format": _CACHE_FORMAT,
        "images": data.images,
        "labels": data.labels,
        "class_names": list(data.class_names),
        "source": data.source,
    }
    try:
        atomic_write(cache_file, lambda f: torch.save(blob, f))
    except OSError as exc:  # caching is an optimisation; a read-only home is fine
        log.warning("could not write dataset cache %s: %s", cache_file, exc)
