"""Where a component's accuracy goes: one torchvision architecture trained briefly on
CIFAR-10 (300 images a class, 3 epochs, seed 0), located (20 samples a class), and
the component of classes {0, 1, 2} measured on their located images with

- the located masks (with and without mean compensation);
- every prunable channel atom pruned alone (the rest kept), as its masks say;
- random masks that keep as many channels of every atom as the located ones.

    python -m experiments.channel_ablation [--arch shufflenet_v2_x0_5]

About 2 minutes on 2 CPU cores for shufflenet_v2_x0_5 (docs/architecture.md)."""

from __future__ import annotations

import argparse

import torch
import torchvision.models as tvm

from lego_core import CIFAR10_SPEC, load_image_folder, locate, shared_data_dir, source_from_module
from lego_core.data import normalize
from lego_core.disassemble import class_set_demand, input_means, prune_graph
from lego_core.graph import GraphNet
from lego_core.train import train

TASK = [0, 1, 2]
SAMPLES = 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="shufflenet_v2_x0_5")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_image_folder(
        shared_data_dir() / "cifar10-train.tar.gz", CIFAR10_SPEC, per_class_limit=300
    )
    torch.manual_seed(0)
    module = train(getattr(tvm, args.arch)(num_classes=10), data, CIFAR10_SPEC, epochs=3)
    model = source_from_module(module, CIFAR10_SPEC, data.class_names, args.arch)
    comps = locate(model, data, samples_per_class=SAMPLES)
    rows = torch.cat([comps.selected[c] for c in TASK])
    x = normalize(data.images[rows], CIFAR10_SPEC)
    y = torch.arange(len(TASK)).repeat_interleave(SAMPLES)
    means = input_means(model, data, rows)
    spaces = model.spaces

    @torch.no_grad()
    def accuracy(demanded, compensate=False) -> float:
        graph = prune_graph(model, demanded, TASK, means if compensate else None)
        return float((GraphNet(graph)(x).argmax(1) == y).float().mean())

    located = class_set_demand(model, comps, TASK)
    whole = {
        spaces.root(a): torch.ones(spaces.sizes[a], dtype=torch.bool)
        for a in range(len(spaces.sizes))
    }
    print(f"{args.arch}: source (all channels) {accuracy(whole):.3f}")
    print(f"located masks {accuracy(located):.3f}, compensated {accuracy(located, True):.3f}")
    print("atom pruned alone: kept/size accuracy (its producing layers)")
    for root, mask in located.items():
        if spaces.is_fixed(root) or bool(mask.all()):
            continue
        producers = [
            n.layer
            for n in model.graph.layers()
            if any(spaces.root(a) == root for a, _ in spaces.layout[n.name])
        ]
        alone = {**whole, root: mask}
        print(f"  {int(mask.sum())}/{mask.numel()} {accuracy(alone):.3f} {producers[:2]}")
    g = torch.Generator().manual_seed(0)
    random = {}
    for root, mask in located.items():
        keep = torch.zeros_like(mask)
        keep[torch.randperm(mask.numel(), generator=g)[: int(mask.sum())]] = True
        random[root] = mask if spaces.is_fixed(root) else keep
    print(f"random masks at the located keep rate {accuracy(random):.3f}")


if __name__ == "__main__":
    main()
