"""Data, seeded source models and located components for the experiments,
cached under `.cache/experiments/` so that a re-run skips training and locating.

Everything here goes through lego_core's public code paths: `build_model` and
`lego_core.train.train` to train, `source_from_module` to capture, `locate` to
locate components (with `Components.save` / `load` as the cache).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lego_core import (
    CIFAR10_SPEC,
    MNIST_SPEC,
    Components,
    ImageFolderData,
    InputSpec,
    SourceModel,
    build_model,
    load_image_folder,
    locate,
    shared_data_dir,
    source_from_module,
)
from lego_core.train import train

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "experiments"

# MNIST digits as 32x32 RGB, for the MNIST + CIFAR-10 assembly: the assembled
# model takes raw 3x32x32 images (normalisation happens inside each branch, so
# mean and std here do not matter: only the decoded size and channels do).
MNIST_RGB32_SPEC = InputSpec(3, 32, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass(frozen=True)
class ModelPlan:
    """One source model: architecture, dataset, class indices (into the
    dataset's sorted class list), seed and epochs."""

    key: str
    arch: str
    dataset: str  # "mnist" | "cifar10"
    classes: tuple[int, ...]
    seed: int
    epochs: int

    @property
    def spec(self) -> InputSpec:
        return MNIST_SPEC if self.dataset == "mnist" else CIFAR10_SPEC

    @property
    def augment(self) -> bool:
        return self.dataset == "cifar10"  # crops and flips suit natural images, not digits


@dataclass
class Settings:
    quick: bool
    train_per_class: int | None  # None: the whole training set
    test_per_class: int | None
    epochs_scale: float  # multiplies every plan's epochs (at least 1)
    samples_per_class: int = 50
    threads: int = 1
    jobs: int = 1  # processes for table 2's rows
    grid_alpha: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
    grid_beta: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
    sensitivity_models: tuple[str, ...] = ("plain_all", "lenet_mnist")
    cache: Path = CACHE
    extra: dict = field(default_factory=dict)

    def epochs(self, plan: ModelPlan) -> int:
        return max(1, round(plan.epochs * self.epochs_scale))

    def tag(self) -> str:
        return "quick" if self.quick else "full"


FULL = Settings(quick=False, train_per_class=None, test_per_class=None, epochs_scale=1.0)
QUICK = Settings(
    quick=True,
    train_per_class=300,
    test_per_class=100,
    epochs_scale=0.0,  # -> 1 epoch each
    samples_per_class=20,
    grid_alpha=(0.1, 0.3, 0.5),
    grid_beta=(0.0, 0.2, 0.4),
    sensitivity_models=("lenet_mnist",),
    cache=CACHE / "quick",
)


# --------------------------------------------------------------------------- data


def first_per_class(data: ImageFolderData, limit: int | None) -> ImageFolderData:
    """The first `limit` images of every class (in the dataset's path order)."""
    if limit is None:
        return data
    keep = []
    for c in range(len(data.class_names)):
        keep.append(torch.nonzero(data.labels == c).flatten()[:limit])
    return data.subset(torch.sort(torch.cat(keep)).values)


def restrict(data: ImageFolderData, names: list[str]) -> ImageFolderData:
    """The images of `names` only, relabelled so that label i is names[i] (what
    `load_image_folder(..., classes=names)` returns, without decoding again)."""
    index = {data.class_names.index(n): i for i, n in enumerate(names)}
    rows = torch.nonzero(torch.isin(data.labels, torch.tensor(list(index)))).flatten()
    mapping = torch.full((len(data.class_names),), -1, dtype=torch.long)
    for old, new in index.items():
        mapping[old] = new
    return ImageFolderData(
        data.images[rows].clone(), mapping[data.labels[rows]], list(names), data.source
    )


class Data:
    """The shared datasets, decoded once (load_image_folder caches the tensors)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.dir = shared_data_dir()
        self._cache: dict[str, ImageFolderData] = {}

    def _load(self, name: str, spec: InputSpec, limit: int | None) -> ImageFolderData:
        key = f"{name}-{spec.channels}x{spec.height}-{limit}"
        if key not in self._cache:
            path = self.dir / f"{name}.tar.gz"
            t = time.time()
            data = load_image_folder(path, spec, progress=False)
            self._cache[key] = first_per_class(data, limit)
            log(
                f"loaded {name} as {spec.shape}: {len(self._cache[key])} images "
                f"({time.time() - t:.1f} s)"
            )
        return self._cache[key]

    def train(self, dataset: str) -> ImageFolderData:
        spec = MNIST_SPEC if dataset == "mnist" else CIFAR10_SPEC
        return self._load(f"{dataset}-train", spec, self.settings.train_per_class)

    def test(self, dataset: str) -> ImageFolderData:
        spec = MNIST_SPEC if dataset == "mnist" else CIFAR10_SPEC
        return self._load(f"{dataset}-test", spec, self.settings.test_per_class)

    def mnist_test_rgb32(self) -> ImageFolderData:
        return self._load("mnist-test", MNIST_RGB32_SPEC, self.settings.test_per_class)

    def class_names(self, dataset: str) -> list[str]:
        return self.train(dataset).class_names


# --------------------------------------------------------------------------- models


@dataclass
class Trained:
    plan: ModelPlan
    model: SourceModel
    train_data: ImageFolderData  # the model's classes only, labels in its order
    components: Components
    meta: dict


def _model_file(settings: Settings, plan: ModelPlan) -> Path:
    classes = "all" if plan.classes == tuple(range(10)) else "-".join(map(str, plan.classes))
    limit = f"-n{settings.train_per_class}" if settings.train_per_class else ""
    name = f"{plan.arch}-{plan.dataset}-{classes}-s{plan.seed}-e{settings.epochs(plan)}{limit}"
    return settings.cache / "models" / f"{name}.pt"


def trained(settings: Settings, data: Data, plan: ModelPlan) -> Trained:
    """Trains (or loads from the cache) the source model of `plan`, captures it
    and locates its components on its training data."""
    names = [data.class_names(plan.dataset)[c] for c in plan.classes]
    train_data = restrict(data.train(plan.dataset), names)
    path = _model_file(settings, plan)
    meta_path = path.with_suffix(".json")
    torch.manual_seed(plan.seed)
    module = build_model(plan.arch, len(names), plan.spec)
    if path.is_file() and meta_path.is_file():
        module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        module.eval()
        meta = json.loads(meta_path.read_text())
        meta["cached"] = True
        log(f"{plan.key}: loaded {path.name}")
    else:
        epochs = settings.epochs(plan)
        log(
            f"{plan.key}: training {plan.arch} on {len(train_data)} {plan.dataset} images, "
            f"{epochs} epoch(s), seed {plan.seed}"
        )
        t = time.time()
        module = train(
            module,
            train_data,
            plan.spec,
            epochs=epochs,
            seed=plan.seed,
            augment=plan.augment,
            progress=False,
        )
        meta = {
            "arch": plan.arch,
            "dataset": plan.dataset,
            "classes": names,
            "seed": plan.seed,
            "epochs": epochs,
            "train_images": len(train_data),
            "augment": plan.augment,
            "train_seconds": round(time.time() - t, 1),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(module.state_dict(), path)
        meta_path.write_text(json.dumps(meta, indent=1))
        meta["cached"] = False
        log(f"{plan.key}: trained in {meta['train_seconds']} s")
    model = source_from_module(module, plan.spec, names, plan.arch, plan.key)

    comp_path = path.with_name(path.stem + f"-located-N{settings.samples_per_class}.pt")
    if comp_path.is_file():
        components = Components.load(comp_path)
    else:
        t = time.time()
        components = locate(model, train_data, samples_per_class=settings.samples_per_class)
        components.save(comp_path)
        meta["locate_seconds"] = round(time.time() - t, 1)
        meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k != "cached"}, indent=1))
        log(f"{plan.key}: located components in {meta['locate_seconds']} s")
    return Trained(plan, model, train_data, components, meta)
