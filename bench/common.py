"""What every figure shares: result rows, alternating timing, medians, machine info."""

from __future__ import annotations

import datetime as dt
import inspect
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024


@dataclass
class Row:
    """One line of the results table.

    `ratio` is the number the goal is judged on; `ratio_text` says which way it
    reads ("12.3x lower", "1.04x the floor", ...). `met` is None where the figure
    has no goal (reported for information) or could not be measured."""

    figure: str
    name: str
    unit: str = ""
    project: float | None = None
    baseline: float | None = None
    ratio: float | None = None
    ratio_text: str = ""
    goal: str = ""
    met: bool | None = None
    status: str = "measured"
    device: str = "cpu"
    project_text: str = ""  # overrides the formatted value (e.g. "yes")
    baseline_text: str = ""
    data: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def not_measured(figure: str, name: str, goal: str, reason: str, device: str = "cpu") -> Row:
    return Row(figure, name, goal=goal, status=f"not measured: {reason}", device=device)


@dataclass
class FigureResult:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was measured, how
    closing: list[str] = field(default_factory=list)  # goals not met: why, what would close it
    data: dict = field(default_factory=dict)


@dataclass
class Config:
    """Sizes of one run; `--quick` shrinks them."""

    quick: bool = False
    device: str = "cpu"
    fig1_samples: int = 128
    fig1_reps: int = 5
    fig2_reps: int = 5
    fig3_reps: int = 9
    serve_requests_1: int = 150  # sequential requests per round at one client
    serve_requests_32: int = 8  # requests per client per round at 32 clients
    serve_rounds: int = 5
    job_reps: int = 5
    api_processes: int = 0  # figure 4's multi-process server (0: the usable cores)
    log: Callable[[str], None] = print

    @classmethod
    def make(cls, quick: bool, device: str, log=print, **over) -> Config:
        c = cls(quick=quick, device=device, log=log)
        if quick:
            c.fig1_samples, c.fig1_reps = 32, 3
            c.fig2_reps, c.fig3_reps = 3, 5
            c.serve_requests_1, c.serve_requests_32, c.serve_rounds = 60, 4, 3
            c.job_reps = 3
        for k, v in over.items():
            if v is not None:
                setattr(c, k, v)
        return c


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str = "cpu") -> float:
    """Seconds one call of `fn` takes (CUDA work included)."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def alternate(
    cases: dict[str, Callable[[], float]],
    reps: int,
    warmup: int = 1,
    warmups: dict[str, Callable[[], object]] | None = None,
) -> dict[str, list[float]]:
    """Runs every case `warmup` times (or its cheaper `warmups` callable instead),
    then `reps` rounds in which every case runs once, baseline and project
    interleaved (order reversed every other round), so that drifting machine load
    hits all cases alike. Each case returns the value it measured (seconds,
    usually). Returns the measured values per case."""
    names = list(cases)
    for _ in range(warmup):
        for n in names:
            (warmups or {}).get(n, cases[n])()
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for n in names if r % 2 == 0 else names[::-1]:
            out[n].append(float(cases[n]()))
    return out


def median(values) -> float:
    return float(statistics.median(values))


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num[i] / den[i]: both sides of a round ran back to back,
    so the load of that moment divides out."""
    return median([a / b for a, b in zip(num, den, strict=True)])


def paired_diff(a: list[float], b: list[float]) -> float:
    """Median over rounds of a[i] - b[i]."""
    return median([x - y for x, y in zip(a, b, strict=True)])


def spread(values) -> dict:
    """Median, min, max and every value in the order the rounds ran."""
    v = [float(x) for x in values]
    return {"median": median(v), "min": min(v), "max": max(v), "n": len(v), "rounds": v}


def accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def fmt_value(v: float | None, unit: str) -> str:
    if v is None:
        return "—"
    if unit == "s":
        return f"{v * 1000:.1f} ms" if v < 1 else f"{v:.2f} s"
    if unit == "ms":
        return f"{v:.2f} ms"
    if unit == "MiB":
        return f"{v / 1024:.2f} GiB" if v >= 1024 else f"{v:.1f} MiB"
    if unit == "FLOPs":
        return f"{v / 1e6:.2f} MFLOPs"
    if unit == "img/s":
        return f"{v:.0f} img/s"
    return f"{v:g} {unit}".strip()


def machine_info(device: str) -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "host_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "cpu_model": cpu or platform.processor(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "load_average_start": list(os.getloadavg()),
        "git": git_revision(),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        return rev + (" + uncommitted changes" if dirty else "")
    except OSError:
        return "unknown"
