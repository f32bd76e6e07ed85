"""Command-line front end to lego_core: train, locate, disassemble, assemble,
evaluate, predict and routes, all working on files.

Files:

- a *source model* is a state_dict (`lego train` writes one) with a sidecar JSON
  of the same stem (`model.pt` -> `model.json`) holding {"arch", "class_names",
  "input_spec"}; `--arch`, `--class-names` and `--spec` override or replace it;
- a *components file* is what `lego locate` writes (`Components.save`);
- an *exported classifier* is the self-contained `.pt` that `lego disassemble`
  and `lego assemble` write (`export_model`): raw [0, 1] images in, logits out.

`add_commands(subparsers)` registers the commands on a parser owned elsewhere
(`app.cli`); `main(argv)` is a standalone `lego` with only these commands
(`python -m lego_core.cli ...`). Bad input of any kind ends in one line,
`lego: error: <reason>`, on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from lego_core.architectures import ARCHITECTURES, build_model
from lego_core.assemble import (
    DEFAULT_CALIBRATION_PER_CLASS,
    DEFAULT_COMPENSATE,
    DEFAULT_SCALING,
    FORMS,
    SCALING_METHODS,
    Part,
    assemble,
)
from lego_core.data import ImageFolderData, load_image_folder
from lego_core.disassemble import fixed_inputs_warning
from lego_core.errors import (
    DatasetError,
    IncompatibleComponentsError,
    LegoError,
    ModelFileError,
)
from lego_core.evaluate import accuracy_on, component_stats, count_flops, count_params
from lego_core.export import ExportedClassifier, export_model, load_exported
from lego_core.fidelity import check_warning, locate_checked
from lego_core.files import atomic_write
from lego_core.locate import DEFAULT_SAMPLES_PER_CLASS, Components
from lego_core.model import FILE_FORMATS, SourceModel, load_source_model
from lego_core.routes import render_routes, route_table
from lego_core.spec import CIFAR10_SPEC, IMAGENET_SPEC, MNIST_SPEC, InputSpec

PROG = "lego"
EXIT_ERROR = 2
NAMED_SPECS = {"mnist": MNIST_SPEC, "cifar10": CIFAR10_SPEC, "imagenet": IMAGENET_SPEC}
SIDECAR_KEYS = ("arch", "class_names", "input_spec")

Handler = Callable[[argparse.Namespace], int]


# --------------------------------------------------------------------------- running


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "unknown error"


def _os_message(exc: OSError) -> str:
    if exc.strerror and exc.filename is not None:
        target = exc.filename
        if exc.filename2 is not None:
            target = f"{target} -> {exc.filename2}"
        return f"{exc.strerror}: {target}"
    return str(exc) or type(exc).__name__


def fail(message: str) -> int:
    """Prints `lego: error: <message>` (one line) to stderr; returns exit code 2."""
    print(f"{PROG}: error: {_one_line(message)}", file=sys.stderr)
    return EXIT_ERROR


_NOISY_LOGGERS = ("torch.export", "torch.export.pt2_archive._package")


@contextlib.contextmanager
def _quiet_torch_export():
    """torch.export warns on every save/load of a file not named `.pt2` (the
    exported classifiers are `.pt` by design) and logs a full traceback as a
    warning before it raises on an unreadable file; lego_core turns that error
    into a one-line ModelFileError, so on the command line both are noise."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _run(handler: Handler, args: argparse.Namespace) -> int:
    try:
        with _quiet_torch_export():
            return int(handler(args) or 0)
    except LegoError as exc:
        return fail(str(exc))
    except OSError as exc:
        return fail(_os_message(exc))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def run_command(args: argparse.Namespace) -> int:
    """Runs `args.func(args)`; a LegoError or OSError becomes one line on
    stderr and exit code 2. Safe on handlers registered by `add_commands`,
    which are wrapped the same way already."""
    func = getattr(args, "func", None)
    if func is None:
        return fail("no command given")
    return _run(getattr(func, "__wrapped__", func), args)


def _guarded(handler: Handler) -> Handler:
    """The handler with `run_command`'s error handling, so that a parser that
    calls `args.func(args)` directly (app.cli) never shows a traceback either."""

    @functools.wraps(handler)
    def func(args: argparse.Namespace) -> int:
        return _run(handler, args)

    return func


# --------------------------------------------------------------------------- parsing


def parse_names(text: str, what: str = "classes") -> list[str]:
    """'0,1,2' or a JSON list '["cat", "dog"]' -> list of names."""
    text = text.strip()
    if text.startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LegoError(f"{what}: not a JSON list: {exc}") from None
        if not isinstance(value, list) or not all(isinstance(v, str | int) for v in value):
            raise LegoError(f"{what}: the JSON must be a list of names")
        names = [str(v) for v in value]
    else:
        names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise LegoError(f"{what}: no names given")
    return names


def parse_spec(text: str) -> InputSpec:
    """'mnist', 'cifar10', 'imagenet', a JSON object or a JSON file -> InputSpec."""
    key = text.strip()
    if key.lower() in NAMED_SPECS:
        return NAMED_SPECS[key.lower()]
    if key.startswith("{"):
        source, raw = "--spec", key
    elif Path(key).is_file():
        source, raw = key, Path(key).read_text()
    else:
        raise LegoError(
            f"unknown input spec '{text}'; use {', '.join(NAMED_SPECS)}, a JSON object "
            "or a JSON file"
        )
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise LegoError(f"{source}: not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise LegoError(f"{source}: the input spec must be a JSON object")
    return InputSpec.from_dict(value)


def parse_threshold(text: str | None, what: str) -> float | dict | None:
    """'0.3' (every layer), 'conv=0.3,linear=0.2' or a JSON object."""
    if text is None:
        return None
    text = text.strip()
    try:
        if text.startswith("{"):
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError("not an object")
            return {str(k): float(v) for k, v in value.items()}
        if "=" in text:
            out = {}
            for item in text.split(","):
                key, _, val = item.partition("=")
                out[key.strip()] = float(val)
            return out
        return float(text)
    except (ValueError, TypeError):
        raise LegoError(f"--{what} must be a number or conv=X,linear=Y, got '{text}'") from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# --------------------------------------------------------------------------- files


def sidecar_path(model_path: str | os.PathLike) -> Path:
    """`model.pt` -> `model.json` (same folder, same stem)."""
    return Path(model_path).with_suffix(".json")


def check_writable(path: str | os.PathLike) -> Path:
    """Fails early (before any long computation) when `path` cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise LegoError(f"output {path} is a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LegoError(f"cannot create the folder of {path}: {_os_message(exc)}") from None
    if not os.access(path.parent, os.W_OK):
        raise LegoError(f"cannot write {path}: its folder is not writable")
    return path


def _atomic_write(path: Path, write: Callable[[object], None], mode: str) -> None:
    check_writable(path)
    try:
        atomic_write(path, write, mode)
    except OSError as exc:
        raise LegoError(f"cannot write {path}: {exc.strerror or exc}") from None


def _write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text), "w")


def read_sidecar(model_path: str | os.PathLike) -> dict:
    """The sidecar JSON of a source model ({} when there is none)."""
    path = sidecar_path(model_path)
    if path == Path(model_path) or not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"sidecar {path} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise ModelFileError(f"sidecar {path} must be a JSON object")
    if "arch" in meta and not isinstance(meta["arch"], str):
        raise ModelFileError(f"sidecar {path}: 'arch' must be a string")
    if "class_names" in meta and not isinstance(meta["class_names"], list):
        raise ModelFileError(f"sidecar {path}: 'class_names' must be a list")
    if "input_spec" in meta and not isinstance(meta["input_spec"], dict):
        raise ModelFileError(f"sidecar {path}: 'input_spec' must be an object")
    return meta


def load_source(
    path: str | os.PathLike,
    arch: str | None = None,
    class_names: str | None = None,
    spec: str | None = None,
) -> SourceModel:
    """A source model from its file, its sidecar JSON and the override flags."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    meta = read_sidecar(path)
    arch = arch or meta.get("arch")
    names = parse_names(class_names, "--class-names") if class_names else meta.get("class_names")
    if spec:
        input_spec = parse_spec(spec)
    elif "input_spec" in meta:
        input_spec = InputSpec.from_dict(meta["input_spec"])
    else:
        input_spec = None
    missing = [
        flag
        for flag, value in (("--arch", arch), ("--class-names", names), ("--spec", input_spec))
        if not value
    ]
    if missing:
        raise ModelFileError(
            f"{path.name}: no sidecar {sidecar_path(path).name} says what the model is; "
            f"pass {', '.join(missing)}"
        )
    return load_source_model(path, arch, names, input_spec, name=path.name)


def load_components(path: str | os.PathLike, model: SourceModel) -> Components:
    """A components file, checked against the model it is used with."""
    path = Path(path)
    if not path.is_file():
        raise LegoError(f"components file not found: {path}")
    comps = Components.load(path)
    layers = model.graph.layers()
    if comps.class_names != model.class_names or comps.layers != [n.layer for n in layers]:
        raise IncompatibleComponentsError(
            f"{path.name} was located on a different model than {model.name} "
            f"(its classes: {_preview(comps.class_names)}; the model's: "
            f"{_preview(model.class_names)})"
        )
    for node in layers:
        size = model.graph.node(node.args[0].name).channels
        for c, masks in comps.masks.items():
            mask = masks.get(node.layer)
            if mask is None or mask.dtype != torch.bool or mask.numel() != size:
                raise IncompatibleComponentsError(
                    f"{path.name} does not fit {model.name}: the mask of class "
                    f"'{comps.class_names[c]}' at layer {node.layer} is not {size} channels"
                )
    return comps


def load_classifier(path: str | os.PathLike) -> ExportedClassifier:
    """An exported classifier (`lego disassemble` / `lego assemble` output)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    try:
        return load_exported(path)
    except ModelFileError as exc:
        if read_sidecar(path):
            raise ModelFileError(
                f"{path.name} is not an exported classifier but has a sidecar "
                f"{sidecar_path(path).name}; pass it as --source-model"
            ) from None
        raise ModelFileError(f"{path.name}: {exc}") from None


def load_data(path: str, spec: InputSpec, classes=None, per_class_limit=None) -> ImageFolderData:
    data = load_image_folder(path, spec, classes=classes, per_class_limit=per_class_limit)
    if len(data) == 0:
        raise DatasetError(f"dataset '{path}' has no images")
    return data


def merge_datasets(datasets: list[ImageFolderData]) -> ImageFolderData:
    """Datasets of one image shape as one, class names unified by name."""
    if len(datasets) == 1:
        return datasets[0]
    names: list[str] = []
    for d in datasets:
        names += [n for n in d.class_names if n not in names]
    labels = [torch.tensor([names.index(n) for n in d.class_names])[d.labels] for d in datasets]
    return ImageFolderData(
        torch.cat([d.images for d in datasets]),
        torch.cat(labels),
        names,
        "+".join(d.source for d in datasets),
    )


def _preview(names: list[str], n: int = 10) -> str:
    return "[" + ", ".join(names[:n]) + (", ..." if len(names) > n else "") + "]"


# --------------------------------------------------------------------------- output


class ProgressBar:
    """A `progress(fraction, message)` callback drawing a tqdm bar on stderr
    (only on a terminal)."""

    def __init__(self, desc: str) -> None:
        self.bar = tqdm(
            total=100,
            desc=desc,
            unit="%",
            disable=None,
            leave=False,
            file=sys.stderr,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}",
        )

    def __call__(self, fraction: float, message: str) -> None:
        n = max(0, min(100, round(100 * float(fraction))))
        self.bar.set_description_str(message, refresh=False)
        self.bar.update(n - self.bar.n)

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


def _table(rows: list[list], header: list[str]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _n(value: int | float) -> str:
    """1234567 -> '1.23M'."""
    value = float(value)
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit}"
    return f"{value:.0f}"


def _ratio(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "-"


# --------------------------------------------------------------------------- commands


def cmd_train(args: argparse.Namespace) -> int:
    from lego_core.train import accuracy, train

    out = check_writable(args.out)
    meta_path = sidecar_path(out)
    if meta_path == out:
        raise LegoError(f"--out {out} would collide with its sidecar; use a .pt name")
    spec = parse_spec(args.spec)
    classes = parse_names(args.classes) if args.classes else None
    data = load_data(args.data, spec, classes, args.limit_per_class)
    torch.manual_seed(args.seed)
    model = build_model(args.arch, len(data.class_names), spec)
    train(
        model,
        data,
        spec,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
        augment=args.augment,
    )
    model.cpu()
    _atomic_write(out, lambda f: torch.save(model.state_dict(), f), "wb")
    meta = {"arch": args.arch, "class_names": list(data.class_names), "input_spec": spec.to_dict()}
    _write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    print(f"trained {args.arch} on {len(data)} images of {len(data.class_names)} classes")
    print(f"  classes: {', '.join(data.class_names)}")
    print(f"  epochs {args.epochs}, seed {args.seed}, params {_n(count_params(model))}")
    if not args.no_accuracy:
        print(f"  train accuracy: {100.0 * accuracy(model, data, spec):.2f}%")
    print(f"wrote {out} and {meta_path}")
    return 0


def cmd_locate(args: argparse.Namespace) -> int:
    check_writable(args.out)
    model = load_source(args.model, args.arch, args.class_names, args.spec)
    alpha = parse_threshold(args.alpha, "alpha")
    beta = parse_threshold(args.beta, "beta")
    classes = parse_names(args.classes) if args.classes else None
    data = load_data(args.data, model.spec, classes, args.limit_per_class)
    with ProgressBar("locating") as bar:
        comps = locate_checked(
            model,
            data,
            samples_per_class=args.samples_per_class,
            alpha=alpha,
            beta=beta,
            shards=args.shards,
            progress=bar,
        )
    comps.stats = component_stats(model, comps)
    # Enough to reload exactly this dataset later (assembly scales with its rows).
    comps.dataset["source"] = str(Path(args.data).resolve())
    comps.dataset["load"] = {"classes": classes, "per_class_limit": args.limit_per_class}
    comps.save(args.out)

    src_params, src_flops = model.graph.param_count(), count_flops(model)
    print(
        f"located {len(comps.located_classes)} of {len(model.class_names)} classes of "
        f"{model.name} on {len(data)} images "
        f"(alpha {comps.parameters['alpha']}, beta {comps.parameters['beta']})"
    )
    rows = []
    for name, s in comps.summary().items():
        kept = sum(k for k, _ in s["layers"].values())
        total = sum(t for _, t in s["layers"].values())
        per_layer = " ".join(f"{k}/{t}" for k, t in s["layers"].values())
        params, flops = s.get("params"), s.get("flops")
        row = [
            name,
            s["samples"],
            f"{kept}/{total} ({_ratio(kept, total)})",
            f"{_n(params)} ({_ratio(params, src_params)})" if params is not None else "-",
            f"{_n(flops)} ({_ratio(flops, src_flops)})" if flops is not None else "-",
        ]
        rows.append([*row, per_layer] if args.verbose else row)
    header = ["class", "samples", "channels kept", "params", "FLOPs"]
    print(_table(rows, [*header, "per layer"] if args.verbose else header))
    print(f"source: {_n(src_params)} params, {_n(src_flops)} FLOPs")
    for s in comps.parameters["check"]["sets"]:
        print(
            f"check {'+'.join(s['classes'])}: component {s['component']:.2f}, source "
            f"{s['source']:.2f} on their located images ({_ratio(s['params'], 1)} of the params)"
        )
    for warning in (fixed_inputs_warning(model), check_warning(comps)):
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
    print(f"wrote {args.out}")
    return 0


def cmd_disassemble(args: argparse.Namespace) -> int:
    check_writable(args.out)
    model = load_source(args.model, args.arch, args.class_names, args.spec)
    comps = load_components(args.components, model)
    classes = parse_names(args.classes)
    part = Part(model, comps, classes, None, source_id=model.name)
    assembled = assemble([part], scaling="none")
    export_model(assembled, args.out)
    comp = assembled.components[0]
    params, flops = comp.graph.param_count(), count_flops(comp)
    src_params, src_flops = model.graph.param_count(), count_flops(model)
    print(f"component of {model.name} for classes {', '.join(comp.class_names)}")
    print(
        _table(
            [
                ["component", _n(params), _n(flops)],
                ["source", _n(src_params), _n(src_flops)],
                ["ratio", _ratio(params, src_params), _ratio(flops, src_flops)],
            ],
            ["", "params", "FLOPs"],
        )
    )
    print(f"wrote {args.out}")
    return 0


def _parse_part(text: str, n: int) -> tuple[str, str, list[str], str | None]:
    fields = text.split(":", 3)
    if len(fields) < 3 or not all(fields[:3]):
        raise LegoError(
            f"--part {n} '{text}' must be MODEL:COMPONENTS:CLASSES[:DATA], "
            "e.g. m1.pt:comps1.pt:0,1,2"
        )
    data = fields[3] if len(fields) == 4 and fields[3] else None
    return fields[0], fields[1], parse_names(fields[2]), data


def _part_data_overrides(items: list[str] | None, n_parts: int) -> dict[int, str]:
    out = {}
    for item in items or []:
        key, sep, path = item.partition("=")
        if not sep or not key.strip().isdigit() or not path:
            raise LegoError(f"--data-for-part '{item}' must be N=PATH (N counts --part from 1)")
        k = int(key)
        if not 1 <= k <= n_parts:
            raise LegoError(f"--data-for-part {item}: there are {n_parts} parts")
        out[k] = path
    return out


def _part_dataset(n: int, model: SourceModel, comps: Components, path: str | None):
    """The dataset the part's components were located on, rows as at locate time."""
    origin = comps.dataset.get("source") or ""
    if path is None:
        if not origin or not Path(origin).exists():
            shown = f" '{origin}'" if origin else ""
            raise DatasetError(
                f"part {n}: the locating dataset{shown} of its components was not found; "
                "give it as MODEL:COMPONENTS:CLASSES:DATA or with --data-for-part"
            )
        path = origin
    load = comps.dataset.get("load")
    if isinstance(load, dict):  # located by `lego locate`: reload exactly as then
        classes, limit = load.get("classes"), load.get("per_class_limit")
    else:
        classes, limit = comps.dataset.get("class_names") or None, None
    data = load_data(path, model.spec, classes, limit)
    size, names = comps.dataset.get("size"), comps.dataset.get("class_names")
    if (size is not None and len(data) != size) or (names and list(data.class_names) != names):
        raise DatasetError(
            f"part {n}: dataset '{path}' ({len(data)} images, classes "
            f"{_preview(data.class_names)}) is not the one its components were located on "
            f"({size} images, classes {_preview(names or [])})"
        )
    return data


def cmd_assemble(args: argparse.Namespace) -> int:
    check_writable(args.out)
    specs = [_parse_part(text, n) for n, text in enumerate(args.part, 1)]
    overrides = _part_data_overrides(args.data_for_part, len(specs))
    parts = []
    for n, (model_path, comps_path, classes, data_path) in enumerate(specs, 1):
        model = load_source(model_path)
        comps = load_components(comps_path, model)
        model.class_indices(classes)  # unknown classes fail before any data is read
        data = None
        if args.scaling != "none":
            data = _part_dataset(n, model, comps, overrides.get(n, data_path))
        parts.append(Part(model, comps, classes, data, source_id=model.name))
    with ProgressBar("assembling") as bar:
        assembled = assemble(
            parts,
            scaling=args.scaling,
            form=args.form,
            calibration_per_class=args.calibration_per_class,
            compensate=args.compensate,
            progress=bar,
        )
    export_model(assembled, args.out)
    rows = [
        [e["position"], e["class_name"], e["source"], e["class_index"]] for e in assembled.lineage
    ]
    print(
        f"assembled {len(assembled.class_names)} classes from {len(parts)} parts "
        f"(form {assembled.form}, scaling {assembled.scaling})"
    )
    print(_table(rows, ["output", "class", "source model", "source class index"]))
    flops = count_flops(assembled.module, assembled.spec)
    print(f"params {_n(assembled.params)}, FLOPs {_n(flops)}")
    print(f"wrote {args.out}")
    return 0


def _evaluated_model(args: argparse.Namespace):
    """(forward, class names, spec to load data with, spec to normalise with, label)."""
    if args.model:
        clf = load_classifier(args.model)
        return clf, clf.class_names, clf.spec, None, Path(args.model).name
    model = load_source(args.source_model, args.arch, args.class_names, args.spec)
    return model.net(), model.class_names, model.spec, model.spec, model.name


def cmd_evaluate(args: argparse.Namespace) -> int:
    forward, names, spec, norm, label = _evaluated_model(args)
    data = merge_datasets([load_data(p, spec, None, args.limit_per_class) for p in args.data])
    result = accuracy_on(forward, data, list(names), norm, restrict_to_task=args.restrict_to_task)
    if args.json:
        print(json.dumps({"model": label, **result}, indent=2))
        return 0
    print(f"{label}: accuracy {result['accuracy']:.2f}% on {result['images']} images")
    rows = [[name, f"{acc:.2f}%"] for name, acc in result["per_class"].items()]
    print(_table(rows, ["class", "accuracy"]))
    absent = [n for n in names if n not in result["per_class"]]
    if absent:
        print(f"(no test images for {', '.join(absent)})")
    return 0


def read_image(path: str, spec: InputSpec) -> torch.Tensor:
    """An image file -> float [C, H, W] in [0, 1] of `spec`'s channels and size."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            img = img.convert("L" if spec.channels == 1 else "RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, SyntaxError, ValueError) as exc:
        raise LegoError(f"'{path}' is not a readable image: {exc}") from None
    except OSError as exc:
        if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError):
            raise
        raise LegoError(f"'{path}' is not a readable image: {exc}") from None
    if img.size != (spec.width, spec.height):
        img = img.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return t.view(spec.height, spec.width, spec.channels).permute(2, 0, 1).float().div_(255.0)


@torch.no_grad()
def cmd_predict(args: argparse.Namespace) -> int:
    forward, names, spec, norm, _ = _evaluated_model(args)
    x = torch.stack([read_image(p, spec) for p in args.images])
    if norm is not None:
        x = (x - torch.tensor(norm.mean).view(1, -1, 1, 1)) / torch.tensor(norm.std).view(
            1, -1, 1, 1
        )
    probs = torch.softmax(forward(x).float(), dim=1)
    k = max(1, min(args.top_k, len(names)))
    top_p, top_i = probs.topk(k, dim=1)
    results = [
        {
            "image": path,
            "top": [
                {"class": names[i], "probability": round(float(p), 6)}
                for p, i in zip(ps, idx, strict=True)
            ],
        }
        for path, ps, idx in zip(args.images, top_p.tolist(), top_i.tolist(), strict=True)
    ]
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        ranked = ", ".join(f"{t['class']} {100 * t['probability']:.1f}%" for t in r["top"])
        print(f"{r['image']}: {ranked}")
    return 0


def cmd_routes(args: argparse.Namespace) -> int:
    check_writable(args.out)
    model = load_source(args.model, args.arch, args.class_names, args.spec)
    comps = load_components(args.components, model)
    classes = parse_names(args.classes)
    svg = render_routes(model, comps, classes)
    _write_text(Path(args.out), svg + "\n")
    table = route_table(model, comps, classes)
    chosen = [model.class_names[c] for c in model.class_indices(classes)]
    rows = [
        [r["layer"], r["channels"], *(r["per_class"][c] for c in chosen), r["shared"], r["unused"]]
        for r in table
    ]
    print(f"decision routes of {model.name}: input channels used per layer")
    print(_table(rows, ["layer", "channels", *chosen, "shared", "unused"]))
    print(f"wrote {args.out}")
    return 0


# --------------------------------------------------------------------------- parser


def _add_source_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("source model description (default: the model's sidecar JSON)")
    g.add_argument(
        "--arch",
        help=f"architecture: one of {', '.join((*ARCHITECTURES, *FILE_FORMATS))}",
    )
    g.add_argument(
        "--class-names", metavar="NAMES", help="class names in output order: 0,1,2 or a JSON list"
    )
    g.add_argument(
        "--spec",
        help="input spec: mnist, cifar10, imagenet, a JSON object or a JSON file "
        "{channels, height, width, mean, std}",
    )


def _command(sub, name: str, handler: Handler, summary: str, description: str, examples: str):
    p = sub.add_parser(
        name,
        help=summary,
        description=textwrap.fill(description, 79),
        epilog="examples:\n" + examples.strip("\n"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=_guarded(handler))
    return p


def add_commands(subparsers) -> None:
    """Registers train, locate, disassemble, assemble, evaluate, predict and
    routes on an argparse subparsers object; each sets `func`."""
    sub = subparsers
    limit_help = "use only the first N images of each class (path order)"

    p = _command(
        sub,
        "train",
        cmd_train,
        "train a small source model (state_dict + sidecar JSON)",
        "Train a registry architecture on an ImageFolder dataset (directory, .tar, "
        ".tar.gz or .zip) and save its state_dict atomically, with a sidecar JSON "
        "(same stem, .json) holding its arch, class names and input spec.",
        """
  lego train --arch lenet --data mnist-train.tar.gz --out lenet.pt
  lego train --arch lenet --data mnist-train.tar.gz --classes 0,1,2 --epochs 2 --out m1.pt
  lego train --arch plain_cnn --spec cifar10 --data cifar10-train.tar.gz --augment --out c.pt
""",
    )
    p.add_argument("--arch", required=True, choices=ARCHITECTURES, help="architecture")
    p.add_argument("--data", required=True, help="training data: directory or archive")
    p.add_argument("--classes", help="class folders to train on, in output order (default: all)")
    p.add_argument("--spec", default="mnist", help="input spec (default mnist)")
    p.add_argument("--epochs", type=_positive, default=1, help="default 1")
    p.add_argument("--batch-size", type=_positive, default=128, help="default 128")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    p.add_argument("--seed", type=int, default=0, help="seeds weights and shuffling (default 0)")
    p.add_argument("--augment", action="store_true", help="random crop + flip (natural images)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--limit-per-class", type=_positive, metavar="N", help=limit_help)
    p.add_argument("--no-accuracy", action="store_true", help="skip the train accuracy pass")
    p.add_argument("--out", required=True, help="state_dict file to write, e.g. model.pt")

    p = _command(
        sub,
        "locate",
        cmd_locate,
        "locate the component of every class of a source model",
        "Select the most confident samples of each class, sum the relative "
        "contributions and derive per-class channel masks (MDA sections 1-3). "
        "Then score the components of a few class sets against the model on their "
        "located images; where the default thresholds lose the model's decisions, "
        "locate again with looser ones (thresholds given with --alpha/--beta are "
        "kept). Writes a components file and prints each class's component size "
        "and the check.",
        """
  lego locate --model lenet.pt --data mnist-train.tar.gz --out lenet-comps.pt
  lego locate --model lenet.pt --data train/ --alpha conv=0.3,linear=0.4 --beta 0.2 --out c.pt
  lego locate --model net.pt --arch resnet18 --class-names '["cat","dog"]' --spec cifar10 \\
      --data cats-dogs.zip --out comps.pt
""",
    )
    p.add_argument("--model", required=True, help="source model file (state_dict)")
    _add_source_flags(p)
    p.add_argument("--data", required=True, help="locating data (usually the training set)")
    p.add_argument("--classes", help="only these class folders of the data (default: all)")
    p.add_argument("--limit-per-class", type=_positive, metavar="N", help=limit_help)
    p.add_argument(
        "--samples-per-class",
        type=_positive,
        default=DEFAULT_SAMPLES_PER_CLASS,
        help=f"most confident samples used per class (default {DEFAULT_SAMPLES_PER_CLASS})",
    )
    p.add_argument("--alpha", help="contribution threshold: 0.3 or conv=0.3,linear=0.2")
    p.add_argument("--beta", help="relevance threshold: 0.2 or conv=0.2,linear=0.1")
    p.add_argument("--shards", type=_positive, default=1, help="split the sums (default 1)")
    p.add_argument("-v", "--verbose", action="store_true", help="show channels kept per layer")
    p.add_argument("--out", required=True, help="components file to write")

    p = _command(
        sub,
        "disassemble",
        cmd_disassemble,
        "cut the component of a class set out as an exported classifier",
        "Disassemble the component of the given classes from a source model and "
        "export it as a self-contained .pt classifier (raw [0, 1] images in, "
        "logits of the classes out, in the order given).",
        """
  lego disassemble --model lenet.pt --components lenet-comps.pt --classes 0,1,2 --out c012.pt
  lego disassemble --model net.pt --components comps.pt --classes '["cat","dog"]' --out cd.pt
""",
    )
    p.add_argument("--model", required=True, help="source model file")
    _add_source_flags(p)
    p.add_argument("--components", required=True, help="components file from `lego locate`")
    p.add_argument("--classes", required=True, help="class names or indices: 0,1,2 or JSON list")
    p.add_argument("--out", required=True, help="exported classifier to write (.pt)")

    p = _command(
        sub,
        "assemble",
        cmd_assemble,
        "assemble components of several models into one classifier",
        "Assemble the components of class sets from several source models into "
        "one exported classifier (MDA sections 5-6). Each --part is "
        "MODEL:COMPONENTS:CLASSES[:DATA]; the model needs its sidecar JSON. "
        "Scaling other than 'none' uses each part's locating dataset: DATA, "
        "--data-for-part, or the dataset recorded in the components file.",
        """
  lego assemble --part m1.pt:c1.pt:0,1,2 --part m2.pt:c2.pt:7,8,9 --out asm.pt
  lego assemble --part m1.pt:c1.pt:0,1,2:train.tar.gz --part m2.pt:c2.pt:7,8,9 \\
      --data-for-part 2=other-train.tar.gz --form padded --out asm.pt
  lego assemble --part a.pt:ca.pt:0,1 --part b.pt:cb.pt:5 --scaling none --out asm.pt
""",
    )
    p.add_argument(
        "--part",
        action="append",
        required=True,
        metavar="MODEL:COMPONENTS:CLASSES[:DATA]",
        help="a part (repeat for each model, in output order)",
    )
    p.add_argument(
        "--data-for-part",
        action="append",
        metavar="N=PATH",
        help="locating dataset of the N-th --part (from 1)",
    )
    p.add_argument(
        "--scaling",
        choices=SCALING_METHODS,
        default=DEFAULT_SCALING,
        help=f"logit scaling (default {DEFAULT_SCALING})",
    )
    p.add_argument("--form", choices=FORMS, default="branches", help="default branches")
    p.add_argument(
        "--calibration-per-class",
        type=int,
        default=DEFAULT_CALIBRATION_PER_CLASS,
        metavar="N",
        help="samples per class of each part's dataset used to fit the scaling and the "
        f"decision stage (default {DEFAULT_CALIBRATION_PER_CLASS})",
    )
    p.add_argument(
        "--compensate",
        action=argparse.BooleanOptionalAction,
        default=DEFAULT_COMPENSATE,
        help="fold removed channels' mean contribution into biases at disassembly "
        f"(needs the part's dataset; default {'on' if DEFAULT_COMPENSATE else 'off'})",
    )
    p.add_argument("--out", required=True, help="exported classifier to write (.pt)")

    model_help = "exported classifier (.pt from disassemble/assemble)"
    source_help = "source model (state_dict with sidecar JSON)"
    p = _command(
        sub,
        "evaluate",
        cmd_evaluate,
        "accuracy of a classifier on test data",
        "Accuracy, overall and per class, of an exported classifier (--model) or a "
        "source model (--source-model) on test data; images of classes the model "
        "does not have are skipped. Several --data are evaluated together.",
        """
  lego evaluate --model asm.pt --data mnist-test.tar.gz
  lego evaluate --model asm.pt --data test-a.tar.gz --data test-b.zip --json
  lego evaluate --source-model lenet.pt --data mnist-test.tar.gz
""",
    )
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", help=model_help)
    g.add_argument("--source-model", help=source_help)
    _add_source_flags(p)
    p.add_argument("--data", action="append", required=True, help="test data (repeatable)")
    p.add_argument("--limit-per-class", type=_positive, metavar="N", help=limit_help)
    p.add_argument(
        "--restrict-to-task",
        action="store_true",
        help="argmax over the logits of the classes present in the data only",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = _command(
        sub,
        "predict",
        cmd_predict,
        "classify image files",
        "Top-k classes with softmax probabilities for each image. Images are "
        "converted to the model's channels and resized (bilinear) to its input size.",
        """
  lego predict --model asm.pt digit.png
  lego predict --model asm.pt --top-k 5 a.png b.jpg --json
  lego predict --source-model lenet.pt digit.png
""",
    )
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", help=model_help)
    g.add_argument("--source-model", help=source_help)
    _add_source_flags(p)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--top-k", type=_positive, default=3, help="classes shown (default 3)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = _command(
        sub,
        "routes",
        cmd_routes,
        "draw the decision routes of classes as SVG",
        "Draw which input channels of every located layer each chosen class uses "
        "(an SVG, one row per layer) and print the counts per layer.",
        """
  lego routes --model lenet.pt --components lenet-comps.pt --classes 0,1,2 --out routes.svg
""",
    )
    p.add_argument("--model", required=True, help="source model file")
    _add_source_flags(p)
    p.add_argument("--components", required=True, help="components file from `lego locate`")
    p.add_argument("--classes", required=True, help="class names or indices: 0,1,2 or JSON list")
    p.add_argument("--out", required=True, help="SVG file to write")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Model LEGO: locate, disassemble and assemble CNN components (MDA).",
        epilog="Run `lego COMMAND --help` for a command's options and examples.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args)


if __name__ == "__main__":
    raise SystemExit(main())
