"""`make gpu-check`: contributions, locate, assemble and predict on CUDA against the CPU.

    python -m bench.gpu_check [--device cuda|cpu] [--per-class N]

For two source models (two LeNets on MNIST digits 0-4 and 5-9, and a plain_cnn on
CIFAR-10, random weights, seeded: only agreement and speed are checked), it runs
each step on the CPU and on `--device` and compares:

- contribution sums (lego_core.locate.contribution_sums): largest relative difference;
- located masks (lego_core.locate): must be identical;
- the assembled model (lego_core.assemble, mean compensation and scaling fits on the
  device), exported and loaded for predict (lego_core.load_exported on the device):
  logits within 1e-4 of the CPU's;

and prints the time of each step on both. Exits 1 when a check fails. Without CUDA it
says so and exits 0 (`--device cpu` compares the CPU with itself: a run of the script's
own path on a machine without a GPU). It is not a test: `make test` needs no GPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

LOGIT_TOLERANCE = 1e-4


def timed(fn, device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def sources(per_class: int):
    from lego_core import (
        CIFAR10_SPEC,
        MNIST_SPEC,
        build_model,
        load_image_folder,
        shared_data_dir,
        source_from_module,
    )

    data_dir = shared_data_dir()
    out = []
    for n, (arch, spec, archive, classes) in enumerate(
        [
            ("lenet", MNIST_SPEC, "mnist-test.tar.gz", [str(i) for i in range(5)]),
            ("lenet", MNIST_SPEC, "mnist-test.tar.gz", [str(i) for i in range(5, 10)]),
            ("plain_cnn", CIFAR10_SPEC, "cifar10-test.tar.gz", None),
        ]
    ):
        data = load_image_folder(
            data_dir / archive, spec, classes=classes, per_class_limit=per_class, progress=False
        )
        torch.manual_seed(n)
        module = build_model(arch, len(data.class_names), spec).eval()
        model = source_from_module(module, spec, data.class_names, arch, f"{arch}-{n}")
        out.append((model, data))
    return out


def run(device: str, per_class: int) -> int:
    from lego_core import Part, assemble, export_model, load_exported, locate
    from lego_core.device import resolve_device
    from lego_core.locate import contribution_sums, sample_order, select_samples

    device = resolve_device(device)
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "the CPU"
    print(f"gpu-check: {device} ({name}) against the CPU; torch {torch.__version__}")
    failures: list[str] = []
    rows: list[tuple[str, float, float, str]] = []
    parts = []
    for model, data in sources(per_class):
        label = f"{model.name} ({len(data)} images)"
        picked = select_samples(model, data, 20)
        idx, lab = sample_order(picked)
        sums = {}
        for dev in ("cpu", device):
            contribution_sums(model, data, idx[:8], lab[:8], device=dev)  # warm-up

            def pass_(d=dev, m=model, x=data, i=idx, y=lab):
                return contribution_sums(m, x, i, y, device=d)

            sums[dev], t = timed(pass_, dev)
            rows.append((f"contributions {label}", dev, t, ""))
        worst = max(
            float(((sums[device][k] - v).abs() / v.abs().clamp(min=1e-12)).max())
            for k, v in sums["cpu"].items()
        )
        rows[-1] = (*rows[-1][:3], f"largest relative difference {worst:.1e}")

        comps = {}
        for dev in ("cpu", device):
            comps[dev], t = timed(
                lambda d=dev, m=model, x=data: locate(
                    m, x, samples_per_class=20, with_stats=False, device=d
                ),
                dev,
            )
            rows.append((f"locate {label}", dev, t, ""))
        same = all(
            torch.equal(comps["cpu"].masks[c][layer], comps[device].masks[c][layer])
            for c in comps["cpu"].masks
            for layer in comps["cpu"].masks[c]
        ) and all(torch.equal(comps["cpu"].selected[c], comps[device].selected[c]) for c in picked)
        rows[-1] = (*rows[-1][:3], "masks identical" if same else "MASKS DIFFER")
        if not same:
            failures.append(f"{model.name}: masks differ between cpu and {device}")
        parts.append((model, data, comps))

    # Assemble the two LeNets' classes 0-2 and 7-9 (mean compensation and scaling fits
    # on the device), then predict with the exported file on each device.
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for dev in ("cpu", device):
            tasks = (["0", "1", "2"], ["7", "8", "9"])
            chosen = [
                Part(m, c["cpu"], cls, d, m.name)
                for (m, d, c), cls in zip(parts[:2], tasks, strict=True)
            ]
            assembled, t = timed(lambda d=dev, p=chosen: assemble(p, device=d), dev)
            rows.append(("assemble 2 LeNet components", dev, t, ""))
            files[dev] = Path(tmp) / f"{dev}.pt"
            export_model(assembled, files[dev])
        images = parts[0][1].images[:256].float() / 255
        logits = {}
        for dev in ("cpu", device):
            classifier = load_exported(files[dev], device=dev)
            classifier(images[:8])  # warm-up
            logits[dev], t = timed(lambda c=classifier: c(images), dev)
            rows.append(("predict 256 images", dev, t, ""))
        diff = float((logits["cpu"] - logits[device]).abs().max())
        rows[-1] = (*rows[-1][:3], f"largest logit difference {diff:.1e}")
        if not diff <= LOGIT_TOLERANCE:
            failures.append(f"assembled logits differ by {diff:.1e} (> {LOGIT_TOLERANCE:g})")

    width = max(len(r[0]) for r in rows)
    for step, dev, t, note in rows:
        print(f"  {step.ljust(width)}  {dev:>6}  {t * 1000:9.1f} ms  {note}")
    if failures:
        print("FAILED: " + "; ".join(failures))
        return 1
    print(f"gpu-check: OK (masks identical, logits within {LOGIT_TOLERANCE:g})")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.gpu_check", description=__doc__.split("\n")[0]
    )
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (self-check)")
    p.add_argument("--per-class", type=int, default=100, help="images per class of each dataset")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu-check: torch sees no CUDA GPU on this machine; nothing to check.")
        return 0
    return run(args.device, args.per_class)


if __name__ == "__main__":
    sys.exit(main())
