"""Figure 2: locating end to end against its floor.

Project: `lego_core.locate(model, data, samples_per_class=50)` over a 10,000-image
test set: sample selection (a forward pass over every image), the contribution pass
over the selected samples and the masks. (The per-class component statistics,
params and FLOPs of each single-class component, are a report that callers ask
`lego_core.evaluate.component_stats` for; they are not part of locating.)

Floor: one plain forward pass of the same model, as the PyTorch module it was built
from, over the same images in the same batches (256, as sample selection uses),
with the same normalisation.
"""

from __future__ import annotations

import time

import torch

from bench.common import (
    Config,
    FigureResult,
    Row,
    accepts,
    alternate,
    median,
    paired_ratio,
    spread,
    timed,
)

GOAL = 1.5
SAMPLES_PER_CLASS = 50
SELECT_BATCH = 256


def _lenet(device: str):
    """LeNet on MNIST, trained one epoch on 300 training images a digit (seed 0)."""
    from lego_core import MNIST_SPEC, build_model, load_image_folder, shared_data_dir
    from lego_core.train import train

    train_data = load_image_folder(
        shared_data_dir() / "mnist-train.tar.gz", MNIST_SPEC, per_class_limit=300, progress=False
    )
    torch.manual_seed(0)
    module = build_model("lenet", 10, MNIST_SPEC)
    module = train(module, train_data, MNIST_SPEC, epochs=1, seed=0, device="cpu", progress=False)
    data = load_image_folder(shared_data_dir() / "mnist-test.tar.gz", MNIST_SPEC, progress=False)
    return module, MNIST_SPEC, data, "LeNet / MNIST test (trained 1 epoch on 3,000 images)"


def _plain_cnn(device: str):
    from lego_core import CIFAR10_SPEC, build_model, load_image_folder, shared_data_dir

    torch.manual_seed(0)
    module = build_model("plain_cnn", 10, CIFAR10_SPEC)
    data = load_image_folder(
        shared_data_dir() / "cifar10-test.tar.gz", CIFAR10_SPEC, progress=False
    )
    return module, CIFAR10_SPEC, data, "plain_cnn / CIFAR-10 test (random weights)"


CASES = (("lenet", _lenet), ("plain_cnn", _plain_cnn))


def run(cfg: Config) -> FigureResult:
    from lego_core import locate, source_from_module
    from lego_core.data import normalize

    res = FigureResult()
    device = cfg.device
    for name, build in CASES:
        cfg.log(f"[2] {name}: preparing")
        module, spec, data, label = build(device)
        module = module.eval().to(device)
        model = source_from_module(module.cpu(), spec, data.class_names, arch=name, name=name)
        module = module.to(device)
        kw = {}
        if device != "cpu":
            if not accepts(locate, "device"):
                raise RuntimeError("lego_core.locate takes no device argument")
            kw["device"] = device
        n = len(data)

        @torch.inference_mode()
        def floor(module=module, data=data, spec=spec, n=n):
            for start in range(0, n, SELECT_BATCH):
                module(normalize(data.images[start : start + SELECT_BATCH].to(device), spec))

        phases: list[dict] = []

        def project(model=model, data=data, kw=kw, phases=phases):
            marks: dict[str, float] = {}
            t0 = time.perf_counter()

            def progress(fraction, message):
                marks[message] = time.perf_counter() - t0  # last report of each phase

            locate(model, data, samples_per_class=SAMPLES_PER_CLASS, progress=progress, **kw)
            total = time.perf_counter() - t0
            phases.append(phase_times(marks, total))

        few = data.subset(torch.arange(0, n, max(1, n // 1000)))  # warm-up: 1,000 images

        cfg.log(f"[2] {name}: timing locate / floor, {cfg.fig2_reps} rounds")
        times = alternate(
            {
                "project": lambda p=project: timed(p, device),
                "floor": lambda f=floor: timed(f, device),
            },
            cfg.fig2_reps,
            warmups={
                "project": lambda m=model, d=few, kw=kw: locate(m, d, samples_per_class=5, **kw),
                "floor": lambda f=floor: None,
            },
        )
        phases = {
            k: median([p[k] for p in phases[-cfg.fig2_reps :] if p.get(k) is not None] or [0.0])
            for k in ("select_s", "contributions_s", "masks_s")
        }
        phases["selected"] = SAMPLES_PER_CLASS * len(data.class_names)
        t_proj, t_floor = (median(times[k]) for k in ("project", "floor"))
        ratio = paired_ratio(times["project"], times["floor"])
        res.rows.append(
            Row(
                "2",
                f"locate end to end, {name}, {n:,} images, {SAMPLES_PER_CLASS}/class",
                unit="s",
                project=t_proj,
                baseline=t_floor,
                ratio=ratio,
                ratio_text=f"{ratio:.2f}x the floor",
                goal=f"<= {GOAL:g}x the floor",
                met=ratio <= GOAL,
                device=device,
                data={
                    "images": n,
                    "times_s": {k: spread(v) for k, v in times.items()},
                    "phases_s": phases,
                },
            )
        )
        res.notes.append(
            f"{label}: locate {t_proj:.2f} s against one plain forward pass {t_floor:.2f} s. "
            f"Phases (medians, from locate's progress reports): selection, a forward pass of "
            f"the captured graph over every image, {phases['select_s']:.2f} s; contributions "
            f"over {phases['selected']} samples {phases['contributions_s']:.2f} s; masks "
            f"{phases['masks_s']:.2f} s."
        )
        if ratio > GOAL:
            biggest = max(("select_s", "contributions_s", "masks_s"), key=lambda k: phases[k])
            res.closing.append(
                f"{name}: goal not met ({ratio:.2f}x > {GOAL:g}x). The largest phase is "
                f"{biggest[:-2]} ({phases[biggest]:.2f} s). "
                + (
                    f"Selection alone, one forward pass of the captured graph, takes "
                    f"{phases['select_s'] / t_floor:.2f}x the module's forward pass (the graph "
                    "calls its ATen ops one by one from Python and keeps every intermediate "
                    "alive until the pass ends); running selection on the source module, or "
                    "freeing values after their last use, would bring it to the floor. "
                    if phases["select_s"] > 1.2 * t_floor
                    else ""
                )
                + "The contribution pass costs several forward passes per selected sample; "
                "see figure 1 for what would make it cheaper."
            )
    return res


def phase_times(marks: dict[str, float], total: float) -> dict:
    """Phase durations from the time of the last progress report of each phase."""
    sel = marks.get("selecting samples")
    con = marks.get("computing contributions")
    return {
        "select_s": sel,
        "contributions_s": con - sel if sel is not None and con is not None else None,
        "masks_s": total - con if con is not None else None,
    }
