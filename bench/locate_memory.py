"""Memory of `locate` at ImageNet size: ResNet-50 and VGG-16, 224 px, 1000 classes.

    python -m bench.locate_memory [--arch resnet50 vgg16] [--samples-per-class 1]
                                  [--budget-mib 2048] [--out bench/locate_memory.json]

Random weights (seed 0) and random images (`samples-per-class` per class, 1000
classes), so that every class is located. Each architecture runs in its own child
process, and the figure there is the rise of the process's peak resident set
(ru_maxrss) from its baseline: the model, the images and one plain forward pass of
the captured graph at the batch size locate uses (so "beyond the model and one
batch", as `locate`'s `memory_budget` is defined). The dense float64 [classes x Q x P]
sums of earlier versions would need `dense_gib` (reported) for the same run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

GiB = 1 << 30


def _rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(arch: str, samples_per_class: int, budget: int) -> dict:
    import torchvision.models as tvm

    from lego_core import IMAGENET_SPEC, ImageFolderData, locate, source_from_module
    from lego_core.data import normalize
    from lego_core.locate import SELECT_BATCH, class_bytes, classes_per_block, forward_batch

    classes = [f"n{i:04d}" for i in range(1000)]
    torch.manual_seed(0)
    module = getattr(tvm, arch)(num_classes=1000).eval()
    model = source_from_module(module, IMAGENET_SPEC, classes, arch)
    del module
    n = samples_per_class * len(classes)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 3, 224, 224), dtype=torch.uint8, generator=g)
    data = ImageFolderData(images, torch.arange(n) % len(classes), classes, "random")
    batch = forward_batch(model, SELECT_BATCH)
    with torch.no_grad():
        model.net()(normalize(images[:batch], model.spec))
    baseline = _rss_peak()
    dense = sum(
        model.graph.tensors[node.weight_key()][:, :, 0, 0].numel()
        if node.kind == "conv"
        else model.graph.tensors[node.weight_key()].numel()
        for node in model.graph.layers()
    )
    t0 = time.perf_counter()
    shown = [-1]

    def progress(fraction: float, message: str) -> None:
        if int(fraction * 20) > shown[0]:  # every 5%, on stderr
            shown[0] = int(fraction * 20)
            print(f"{arch}: {100 * fraction:.0f}% {message}", file=sys.stderr, flush=True)

    comps = locate(
        model, data, samples_per_class=samples_per_class, memory_budget=budget, progress=progress
    )
    seconds = time.perf_counter() - t0
    rise = max(0, _rss_peak() - baseline)
    return {
        "arch": arch,
        "classes": len(classes),
        "samples": n,
        "located": len(comps.located_classes),
        "batch": batch,
        "budget_gib": budget / GiB,
        "class_mib": class_bytes(model) / (1 << 20),
        "classes_per_block": classes_per_block(model, budget),
        "baseline_rss_gib": baseline / GiB,
        "peak_rise_gib": rise / GiB,
        "within_budget": rise <= budget,
        "dense_gib": 8 * dense * len(classes) / GiB,
        "locate_s": seconds,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", nargs="+", default=["resnet50", "vgg16"])
    ap.add_argument("--samples-per-class", type=int, default=1)
    ap.add_argument("--budget-mib", type=int, default=2048)
    ap.add_argument("--out", default="")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    budget = args.budget_mib << 20
    if args.child:
        print(json.dumps(measure(args.arch[0], args.samples_per_class, budget)))
        return 0
    rows: list[dict] = []
    for arch in args.arch:
        cmd = [sys.executable, "-m", "bench.locate_memory", "--child", "--arch", arch]
        cmd += ["--samples-per-class", str(args.samples_per_class)]
        cmd += ["--budget-mib", str(args.budget_mib)]
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        row["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        row["git"] = _git()
        rows.append(row)
        if args.out:  # after every architecture, so that a run cut short keeps what finished
            _write(args.out, rows)
        print(
            f"{arch}: {row['samples']} images, {row['classes']} classes, "
            f"{row['classes_per_block']} classes a block: peak RSS rise "
            f"{row['peak_rise_gib']:.2f} GiB (budget {row['budget_gib']:.2f} GiB, "
            f"{'within' if row['within_budget'] else 'OVER'}); dense sums would need "
            f"{row['dense_gib']:.0f} GiB; locate {row['locate_s']:.0f} s",
            flush=True,
        )
    return 0 if all(r["within_budget"] for r in rows) else 1


def _git() -> str:
    from bench.common import REPO

    cmd = ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]
    return subprocess.run(cmd, stdout=subprocess.PIPE, text=True).stdout.strip()


def _write(path: str, rows: list[dict]) -> None:
    """Merges `rows` into the JSON list at `path` (one row per architecture, the
    newest kept), written atomically; bench/run.py shows bench/locate_memory.json
    as a section of RESULTS.md."""
    from pathlib import Path

    from lego_core.files import atomic_write

    old = json.loads(Path(path).read_text()) if Path(path).exists() else []
    merged = {r["arch"]: r for r in [*old, *rows]}
    text = json.dumps(list(merged.values()), indent=2) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


if __name__ == "__main__":
    sys.exit(main())
