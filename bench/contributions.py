"""Figure 1: the relative-contribution pass, the project against the reference formulation.

Project: `lego_core.locate.contribution_sums` (a forward pass with a hook before every
conv/linear layer that adds the exact fast form of MDA section 2 to per-class float64
sums).

Baseline, implemented here: the reference formulation. For every located conv layer,
the input is unfolded (`F.unfold`, [B, P*K, L] with K = kh*kw taps and L output
positions), multiplied with the weights [Q, P, K] into the per-position partial
convolutions a_{q,p}[l] of shape B x Q x P x L (the K taps are contracted inside one
einsum, so the B x Q x P x K x L product is never materialised: a faster baseline than
the literal one), summed over the L positions, clamped at zero per sample and added
to per-class float64 sums; a signed input's positive and negative parts go through
this apart, as the project's rule says (lego_core.contributions, "Signed inputs").
A linear layer is max(w * a, 0) per sample. The same
batches (128 samples) as the project; a block is split over samples only when it
would exceed `REF_BLOCK_ELEMENTS`.

Both sides' sums go through `lego_core.locate.masks_from_sums`; the masks must be
identical.

Peak memory: on CPU, measured in a child process (`python -m bench.contributions
probe ...`) whose glibc returns every block of 64 KiB or more to the OS on free
(MALLOC_MMAP_THRESHOLD_), so the resident set follows the live tensors: a thread
samples /proc/self/statm every 0.5 ms, and the figure is the largest rise of the
resident set during one layer's contribution work (hook entry to exit: the
intermediates of that layer, plus its per-class sums when they are first allocated;
the forward pass's own activations are already resident at hook entry and are not
counted). On CUDA: torch.cuda.max_memory_allocated over the same window.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import threading

import torch
import torch.nn.functional as F

from bench.common import (
    REPO,
    Config,
    FigureResult,
    MiB,
    Row,
    accepts,
    alternate,
    median,
    paired_ratio,
    spread,
    timed,
)

# (arch, input side, time goal: reference / project at least this)
CASES = (("vgg16_bn", 32, 10.0), ("resnet18", 64, 20.0))
MEMORY_GOAL = 10.0
# Largest B x Q x P x L block the reference materialises at once: 2^29 float32
# elements = 2 GiB, which holds a whole batch of 128 for both cases (vgg16_bn at
# 32x32 needs exactly 2^29 at its 64-channel 32x32 layers).
REF_BLOCK_ELEMENTS = 1 << 29
BATCH = 128


def _batch() -> int:
    from lego_core import locate as loc

    return int(getattr(loc, "CONTRIBUTION_BATCH", BATCH))


def load_case(arch: str, size: int, n: int, device: str = "cpu"):
    """The model (random weights, seed 0), CIFAR-10 test images at size x size, and
    `n` samples: the first images of each class, in class order."""
    from lego_core import (
        CIFAR10_SPEC,
        InputSpec,
        build_model,
        load_image_folder,
        shared_data_dir,
        source_from_module,
    )

    spec = InputSpec(3, size, size, CIFAR10_SPEC.mean, CIFAR10_SPEC.std)
    data = load_image_folder(
        shared_data_dir() / "cifar10-test.tar.gz",
        spec,
        per_class_limit=math.ceil(n / 10),
        progress=False,
    )
    classes = len(data.class_names)
    idx = []
    for c in range(classes):
        members = torch.nonzero(data.labels == c).flatten()
        idx.append(members[: n // classes + (1 if c < n % classes else 0)])
    idx = torch.cat(idx)
    labels = data.labels[idx]
    torch.manual_seed(0)
    module = build_model(arch, classes, spec)
    model = source_from_module(module, spec, data.class_names, arch=arch, name=arch)
    return model, data, idx, labels


# --------------------------------------------------------------------------- baseline


class ReferenceContributions:
    """The reference formulation as a GraphNet hook: per-position partial
    convolutions B x Q x P x L, summed over positions, clamped per sample, summed
    per class in float64."""

    def __init__(self, model, num_classes: int, device: str, block: int = REF_BLOCK_ELEMENTS):
        self.weights = {
            n.layer: model.graph.tensors[n.weight_key()].to(device) for n in model.graph.layers()
        }
        self.num_classes = num_classes
        self.block = block
        self.sums: dict[str, torch.Tensor] = {}
        self.labels: torch.Tensor | None = None
        self.largest_block = 0  # elements of the largest B x Q x P x L block
        self.chunked = False

    def _acc(self, layer: str, q: int, p: int, device) -> torch.Tensor:
        acc = self.sums.get(layer)
        if acc is None:
            acc = self.sums[layer] = torch.zeros(
                self.num_classes, q, p, dtype=torch.float64, device=device
            )
        return acc

    def add(self, node, x: torch.Tensor) -> None:
        w = self.weights[node.layer]
        labels = self.labels
        b = x.shape[0]
        if node.kind == "linear":
            q, p = w.shape
            acc = self._acc(node.layer, q, p, x.device)
            step = max(1, self.block // (q * p))
            for i in range(0, b, step):
                part = (w[None] * x[i : i + step, None, :]).clamp_(min=0)
                acc.index_add_(0, labels[i : i + step], part.double())
            return
        stride, padding, dilation, groups = node.conv_options()
        q, pg, kh, kw = w.shape
        k = kh * kw
        acc = self._acc(node.layer, q, pg, x.device)
        wg = w.reshape(groups, q // groups, pg, k)
        out_h = (x.shape[2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        out_w = (x.shape[3] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        positions = out_h * out_w
        step = max(1, min(b, self.block // (q * pg * positions)))
        self.chunked |= step < b
        signed = bool(x.amin() < 0)
        parts = (x.clamp(min=0), x.clamp(max=0)) if signed else (x,)
        for i, part in itertools.product(range(0, b, step), parts):
            xs = part[i : i + step]
            bs = xs.shape[0]
            cols = F.unfold(xs, (kh, kw), dilation=dilation, padding=padding, stride=stride)
            cols = cols.view(bs, groups, pg, k, positions)
            # a[b, g, q, p, l]: output position l of map q due to input channel p alone.
            a = torch.einsum("bgpkl,gqpk->bgqpl", cols, wg)
            self.largest_block = max(self.largest_block, a.numel())
            s = a.sum(-1).reshape(bs, q, pg).clamp_(min=0)
            del a
            acc.index_add_(0, labels[i : i + step], s.double())


@torch.no_grad()
def reference_sums(model, data, idx, labels, device: str = "cpu", meter=None):
    from lego_core.data import normalize

    net = model.net().to(device)
    ref = ReferenceContributions(model, len(model.class_names), device)
    net.hook = ref.add if meter is None else (lambda n, x: meter.measure(lambda: ref.add(n, x)))
    batch = _batch()
    for start in range(0, idx.numel(), batch):
        ref.labels = labels[start : start + batch].to(device)
        net(normalize(data.images[idx[start : start + batch]].to(device), model.spec))
    return {k: v.cpu() for k, v in ref.sums.items()}, ref


def project_sums(model, data, idx, labels, device: str = "cpu"):
    from lego_core.locate import contribution_sums

    kw = {"device": device} if accepts(contribution_sums, "device") else {}
    if device != "cpu" and not kw:
        raise RuntimeError("lego_core.locate.contribution_sums takes no device argument")
    return {k: v.cpu() for k, v in contribution_sums(model, data, idx, labels, **kw).items()}


@torch.no_grad()
def forward_only(model, data, idx, device: str = "cpu") -> None:
    from lego_core.data import normalize

    net = model.net().to(device)
    batch = _batch()
    for start in range(0, idx.numel(), batch):
        net(normalize(data.images[idx[start : start + batch]].to(device), model.spec))


def compare_masks(model, ref_sums, proj_sums, labels) -> dict:
    from lego_core.locate import DEFAULT_ALPHA, DEFAULT_BETA, masks_from_sums

    classes = sorted(set(labels.tolist()))
    alpha, beta = dict(DEFAULT_ALPHA), dict(DEFAULT_BETA)
    mr = masks_from_sums(model, ref_sums, classes, alpha, beta)
    mp = masks_from_sums(model, proj_sums, classes, alpha, beta)
    differ = total = 0
    for c in classes:
        for layer, m in mr[c].items():
            differ += int((m != mp[c][layer]).sum())
            total += m.numel()
    from lego_core.locate import layer_sums, located_layers

    rel = 0.0
    for node in located_layers(model.graph):  # depthwise convs decide no mask
        r = ref_sums[node.layer][classes]
        p = torch.stack([layer_sums(model, proj_sums, c, node.layer) for c in classes])
        scale = float(r.abs().max()) or 1.0
        rel = max(rel, float((r - p).abs().max()) / scale)
    return {
        "identical": differ == 0,
        "differing_entries": differ,
        "entries": total,
        "classes": len(classes),
        "max_rel_diff_of_sums": rel,
    }


def work_elements(model) -> dict:
    """Per sample: elements of the reference's B x Q x P x L products and of the
    project's per-sample B x Q x P contributions, over all located layers."""
    ref = proj = largest = 0
    for n in model.graph.layers():
        w = model.graph.tensors[n.weight_key()]
        qp = w.shape[0] * w.shape[1]
        largest = max(largest, qp)
        positions = 1
        if n.kind == "conv":
            positions = n.shape[1] * n.shape[2] if n.shape and len(n.shape) == 3 else 1
        ref += qp * positions
        proj += qp
    return {"reference_qpl": ref, "project_qp": proj, "largest_qp": largest}


# --------------------------------------------------------------------------- memory


class RssMeter:
    """Largest rise of the resident set during `measure(fn)` (a sampling thread)."""

    def __init__(self, interval: float = 0.0005) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self._f = open("/proc/self/statm", "rb")  # noqa: SIM115 - closed in close()
        self._lock = threading.Lock()
        self.peak = self.rss()
        self.largest = 0
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def rss(self) -> int:
        self._f.seek(0)
        return int(self._f.read().split()[1]) * self.page

    def _run(self) -> None:
        f = open("/proc/self/statm", "rb")  # noqa: SIM115 - this thread's own handle
        while not self._stop.wait(self.interval):
            f.seek(0)
            r = int(f.read().split()[1]) * self.page
            if r > self.peak:
                self.peak = r
        f.close()

    def measure(self, fn):
        base = self.rss()
        self.peak = base
        out = fn()
        self.largest = max(self.largest, max(self.peak, self.rss()) - base)
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._f.close()


class CudaMeter:
    def __init__(self) -> None:
        self.largest = 0

    def measure(self, fn):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        self.largest = max(self.largest, torch.cuda.max_memory_allocated() - base)
        return out

    def close(self) -> None:
        pass


def measure_memory(model, data, idx, labels, device: str) -> dict:
    """Largest per-layer working set of each side (bytes); see the module docstring.
    The project's side is measured around `ContributionAccumulator.add`, the body of
    the hook that `contribution_sums` installs."""
    from lego_core import contributions as contrib

    meter = CudaMeter() if device.startswith("cuda") else RssMeter()
    try:
        original = contrib.ContributionAccumulator.add

        def metered(self, *args, **kwargs):
            return meter.measure(lambda: original(self, *args, **kwargs))

        contrib.ContributionAccumulator.add = metered
        try:
            project_sums(model, data, idx, labels, device)
        finally:
            contrib.ContributionAccumulator.add = original
        project = meter.largest
        meter.largest = 0
        _, ref = reference_sums(model, data, idx, labels, device, meter=meter)
        reference = meter.largest
    finally:
        meter.close()
    return {
        "project_bytes": project,
        "reference_bytes": reference,
        "reference_largest_block_bytes": ref.largest_block * 4,
        "reference_chunked": ref.chunked,
        "method": (
            "torch.cuda.max_memory_allocated per layer"
            if device.startswith("cuda")
            else "resident-set rise per layer (0.5 ms sampling, glibc mmap threshold 64 KiB)"
        ),
    }


def probe_main(argv: list[str]) -> int:
    """Child process entry: `probe ARCH SIZE N` prints the memory figures as JSON."""
    arch, size, n = argv[0], int(argv[1]), int(argv[2])
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    model, data, idx, labels = load_case(arch, size, n)
    print("BENCH-JSON " + json.dumps(measure_memory(model, data, idx, labels, "cpu")))
    return 0


def memory_in_child(arch: str, size: int, n: int) -> dict:
    env = dict(os.environ)
    env.update(
        MALLOC_MMAP_THRESHOLD_="65536",
        MALLOC_TRIM_THRESHOLD_="0",
        MALLOC_TOP_PAD_="0",
        BENCH_THREADS=str(torch.get_num_threads()),
    )
    out = subprocess.run(
        [sys.executable, "-m", "bench.contributions", "probe", arch, str(size), str(n)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    for line in out.stdout.splitlines():
        if line.startswith("BENCH-JSON "):
            return json.loads(line[len("BENCH-JSON ") :])
    raise RuntimeError(f"memory probe failed ({out.returncode}): {out.stderr[-2000:]}")


# --------------------------------------------------------------------------- figure


def run(cfg: Config) -> FigureResult:
    res = FigureResult()
    device = cfg.device
    for arch, size, goal in CASES:
        label = f"{arch} {size}x{size}"
        cfg.log(f"[1] {label}: loading, {cfg.fig1_samples} samples")
        model, data, idx, labels = load_case(arch, size, cfg.fig1_samples, device)
        n = int(idx.numel())
        last: dict = {}

        def ref_case(model=model, data=data, idx=idx, labels=labels, last=last):
            def go():
                last["ref"], last["ref_obj"] = reference_sums(model, data, idx, labels, device)

            return timed(go, device)

        def proj_case(model=model, data=data, idx=idx, labels=labels, last=last):
            def go():
                last["proj"] = project_sums(model, data, idx, labels, device)

            return timed(go, device)

        def fwd_case(model=model, data=data, idx=idx):
            return timed(lambda: forward_only(model, data, idx, device), device)

        cfg.log(f"[1] {label}: timing reference / project / forward, {cfg.fig1_reps} rounds")
        few = (idx[:16], labels[:16])  # warm-up: one small batch per side
        times = alternate(
            {"reference": ref_case, "project": proj_case, "forward": fwd_case},
            cfg.fig1_reps,
            warmups={
                "reference": lambda m=model, d=data, f=few: reference_sums(m, d, *f, device),
                "project": lambda m=model, d=data, f=few: project_sums(m, d, *f, device),
                "forward": lambda m=model, d=data, f=few: forward_only(m, d, f[0], device),
            },
        )
        masks = compare_masks(model, last["ref"], last["proj"], labels)
        cfg.log(f"[1] {label}: masks identical: {masks['identical']}; measuring memory")
        if device.startswith("cuda"):
            mem = measure_memory(model, data, idx, labels, device)
        else:
            mem = memory_in_child(arch, size, cfg.fig1_samples)
        t_ref, t_proj, t_fwd = (median(times[k]) for k in ("reference", "project", "forward"))
        ratio = paired_ratio(times["reference"], times["project"])
        work = work_elements(model)
        extra_ref, extra_proj = t_ref - t_fwd, t_proj - t_fwd
        common = {
            "samples": n,
            "batch": _batch(),
            "times_s": {k: spread(v) for k, v in times.items()},
            "work_elements_per_sample": work,
        }
        res.rows.append(
            Row(
                "1",
                f"contribution pass, {label}, {n} samples: time",
                unit="s",
                project=t_proj,
                baseline=t_ref,
                ratio=ratio,
                ratio_text=f"{ratio:.1f}x lower",
                goal=f">= {goal:g}x lower",
                met=ratio >= goal,
                device=device,
                data=common,
            )
        )
        mratio = mem["reference_bytes"] / max(1, mem["project_bytes"])
        res.rows.append(
            Row(
                "1",
                f"contribution pass, {label}: peak memory of one layer's contribution work",
                unit="MiB",
                project=mem["project_bytes"] / MiB,
                baseline=mem["reference_bytes"] / MiB,
                ratio=mratio,
                ratio_text=f"{mratio:.1f}x lower",
                goal=f">= {MEMORY_GOAL:g}x lower",
                met=mratio >= MEMORY_GOAL,
                device=device,
                data=mem,
            )
        )
        res.rows.append(
            Row(
                "1",
                f"contribution pass, {label}: masks identical (masks_from_sums of both)",
                project_text="yes" if masks["identical"] else "no",
                baseline_text="(reference)",
                ratio_text=(
                    "identical"
                    if masks["identical"]
                    else f"{masks['differing_entries']} of {masks['entries']} entries differ"
                ),
                goal="identical",
                met=masks["identical"],
                device=device,
                data=masks,
            )
        )
        res.notes.append(
            f"{label}: {n} CIFAR-10 test images (the first of each class), random weights "
            f"(seed 0), batches of {_batch()}. The plain forward pass over them takes "
            f"{t_fwd * 1000:.0f} ms; without it the contribution work is "
            f"{extra_ref:.2f} s (reference) vs {extra_proj:.2f} s (project), "
            f"{extra_ref / max(extra_proj, 1e-9):.1f}x. Per sample the reference materialises "
            f"{work['reference_qpl'] / 1e6:.1f}M partial-convolution elements (sum of Q*P*L), "
            f"the project {work['project_qp'] / 1e6:.2f}M clamped contributions (sum of Q*P), "
            f"{work['reference_qpl'] / work['project_qp']:.1f}x fewer. Sums agree to "
            f"{masks['max_rel_diff_of_sums']:.1e} (relative); masks: "
            + (
                f"identical ({masks['entries']} entries, {masks['classes']} classes)."
                if masks["identical"]
                else f"{masks['differing_entries']} of {masks['entries']} entries differ."
            )
            + f" Memory: {mem['method']}; the reference's largest B x Q x P x L block is "
            f"{mem['reference_largest_block_bytes'] / MiB:.0f} MiB"
            + (" (split over samples to stay under 2 GiB)." if mem["reference_chunked"] else ".")
        )
        if not res.rows[-3].met:
            text = (
                f"{label}: time goal not met ({ratio:.1f}x < {goal:g}x). The per-sample clamp "
                "forces one value per sample, output and input channel: "
                f"{work['project_qp'] / 1e6:.2f}M a sample here (sum of Q*P), against the "
                f"reference's {work['reference_qpl'] / 1e6:.1f}M partial-convolution outputs "
                f"(sum of Q*P*L, {work['reference_qpl'] / work['project_qp']:.1f}x more, each "
                "also K multiply-adds)."
            )
            bound = t_ref / max(t_fwd, 1e-9)
            text += (
                f" Both sides run the same forward pass ({t_fwd * 1000:.0f} ms), which bounds "
                f"the ratio at {bound:.1f}x even if the project's contribution work cost "
                f"nothing; that work alone is {extra_ref / max(extra_proj, 1e-9):.1f}x lower "
                f"({extra_proj:.2f} s against {extra_ref:.2f} s). The project already forms "
                "the per-sample values, clamps them and sums them per class in cache-sized "
                "blocks. What would close it: a fused kernel that never writes the "
                "per-sample values (tap-sum x weight product, clamp and class sum in "
                "registers), together with a faster forward pass (the graph runs NCHW; a "
                "channels-last forward measured about 15% faster on this CPU)."
            )
            res.closing.append(text)
        if not res.rows[-2].met:
            sums_mib = work["largest_qp"] * len(model.class_names) * 8 / MiB
            res.closing.append(
                f"{label}: memory goal not met ({mratio:.1f}x < {MEMORY_GOAL:g}x). The "
                "reference's per-layer working set is its B x Q x P x L block "
                f"({mem['reference_largest_block_bytes'] / MiB:.0f} MiB at {min(n, _batch())} "
                "samples a batch, growing with the batch). The project's "
                f"{mem['project_bytes'] / MiB:.0f} MiB is its block of per-sample values (capped "
                "by its block size, whatever the batch) plus the float64 per-class sums of the "
                f"layer ({sums_mib:.0f} MiB for the largest layer, allocated on first use). "
                "Here L is small where Q*P is large (the deepest stages), so the reference's "
                "block is small exactly where the project's is largest. A smaller per-sample "
                "block (a time/memory trade-off) or a kernel that sums per class without "
                "writing the per-sample values would raise the ratio."
            )
        if not masks["identical"]:
            res.closing.append(
                f"{label}: masks differ in {masks['differing_entries']} entries. Both sums are "
                "float32 per sample; a contribution that lands within rounding of a threshold "
                "(alpha after the row min-max) flips. Summing the fast form in float64 per "
                "block would make the project the more exact of the two."
            )
        del model, data, last
    return res


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "probe":
        sys.exit(probe_main(sys.argv[2:]))
    print("usage: python -m bench.contributions probe ARCH SIZE N", file=sys.stderr)
    sys.exit(2)
