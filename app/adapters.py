"""The few places where catalog rows and stored artifacts become lego_core objects.

Used by the API (validation, routes, predict) and by the job handlers in
`worker.tasks`, so that both read artifacts the same way. lego_core is imported
lazily: the service starts (and serves its catalog) while lego_core is partial.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

from app.catalog import Dataset, Model
from app.settings import Settings
from app.storage import Storage

# torch.export tracing and loading are not thread-safe (global patching inside torch and
# lego_core's unpickling guard). The API's request threads and the embedded runner share
# one process, so every capture/export/load goes through this lock.
EXPORT_LOCK = threading.RLock()


def archive_limits(settings: Settings):
    from lego_core import ArchiveLimits

    return ArchiveLimits(
        max_members=settings.archive_max_members,
        max_total_bytes=settings.archive_max_total_bytes,
        max_member_bytes=settings.archive_max_member_bytes,
        max_pixels=settings.max_image_pixels,
        max_ratio=settings.archive_max_ratio,
    )


def known_arches() -> tuple[str, ...]:
    """Registry architectures (state_dict uploads) and file formats (exported, torchscript)."""
    from lego_core import ARCHITECTURES, FILE_FORMATS

    return tuple(ARCHITECTURES) + tuple(FILE_FORMATS)


def input_spec(d: dict):
    from lego_core.spec import InputSpec

    return InputSpec.from_dict(d)


SPEC_FIELDS = ("channels", "height", "width", "mean", "std")


def parse_input_spec(d: Any):
    """An input spec sent by a user: exactly the five fields, finite mean and std."""
    import math

    from lego_core.errors import LegoError

    if not isinstance(d, dict):
        raise LegoError("input spec must be a JSON object {channels, height, width, mean, std}")
    unknown = sorted(set(d) - set(SPEC_FIELDS))
    if unknown:
        raise LegoError(
            f"input spec: unknown field(s) {', '.join(map(repr, unknown))}; "
            f"expected {', '.join(SPEC_FIELDS)}"
        )
    spec = input_spec(d)
    if not all(math.isfinite(v) for v in (*spec.mean, *spec.std)):
        raise LegoError("input spec: mean and std must be finite numbers")
    return spec


def archive_suffix(filename: str) -> str | None:
    name = (filename or "").lower()
    for suffix in (".tar.gz", ".tgz", ".tar", ".zip"):
        if name.endswith(suffix):
            return ".tar.gz" if suffix == ".tgz" else suffix
    return None


def named_path(storage: Storage, sha256: str, suffix: str) -> Path:
    """The artifact under a name with `suffix` (a hard link in work/; a copy if links fail).

    Archive readers tell tar from zip by the name; content-addressed objects have none.
    """
    target = storage.work_dir("named") / f"{sha256}{suffix}"
    if not target.exists():
        src = storage.require(sha256)
        tmp = target.with_name(f".{target.name}.{os.getpid()}")
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, target)
    return target


def dataset_path(storage: Storage, ds: Dataset) -> Path:
    return named_path(storage, ds.archive_sha256, ds.archive_suffix)


def load_source(path: Path, arch: str, class_names: list[str], spec):
    from lego_core import load_source_model

    with EXPORT_LOCK:
        return load_source_model(path, arch, class_names, spec)


def weights_suffix(arch: str) -> str:
    return ".pt2" if arch == "exported" else ".pt"


def load_model(storage: Storage, m: Model):
    path = named_path(storage, m.weights_sha256, weights_suffix(m.arch))
    return load_source(path, m.arch, list(m.class_names), input_spec(m.input_spec))


class SourceClassifier:
    """A registered source model as a classifier of raw [0, 1] images (it normalises
    with its input spec's mean and std, as the assembled .pt files do inside)."""

    def __init__(self, source) -> None:
        import torch

        self.net = source.net()
        self.spec = source.spec
        self.class_names = list(source.class_names)
        shape = (1, -1, 1, 1)
        self.mean = torch.tensor(self.spec.mean, dtype=torch.float32).view(shape)
        self.std = torch.tensor(self.spec.std, dtype=torch.float32).view(shape)

    def __call__(self, x):
        return self.net((x - self.mean) / self.std)


def export(assembled, path: Path) -> None:
    from lego_core import export_model

    with EXPORT_LOCK:
        export_model(assembled, path)


def load_classifier(path: Path, device: str = "cpu"):
    from lego_core import load_exported

    with EXPORT_LOCK:
        return load_exported(path, device=device)


def load_dataset(
    storage: Storage,
    settings: Settings,
    ds: Dataset,
    spec,
    classes=None,
    per_class_limit: int | None = None,
):
    from lego_core import load_image_folder

    return load_image_folder(
        dataset_path(storage, ds),
        spec,
        classes=classes,
        per_class_limit=per_class_limit,
        limits=archive_limits(settings),
    )


def params_key(parameters: dict[str, Any]) -> str:
    return json.dumps(parameters, sort_keys=True, separators=(",", ":"))
