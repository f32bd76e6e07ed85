"""Source models: a trained classifier captured as a LegoGraph, with its class
names and input spec. Registry architectures, uploaded state_dicts,
ExportedPrograms and TorchScript files all end up here through `capture`."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from lego_core.errors import ModelFileError, UnknownClassError
from lego_core.graph import (
    GraphNet,
    LegoGraph,
    capture,
    load_exported_program,
    load_torchscript_program,
)
from lego_core.spec import InputSpec

FILE_FORMATS = ("exported", "torchscript")


@dataclass
class SourceModel:
    graph: LegoGraph
    spec: InputSpec
    class_names: list[str]
    arch: str = "module"
    name: str = ""
    _cache: dict = field(default_factory=dict, repr=False)

    @cached_property
    def spaces(self):
        from lego_core.channels import ChannelSpaces

        return ChannelSpaces(self.graph)

    def net(self) -> GraphNet:
        return GraphNet(self.graph).eval()

    def class_index(self, c: int | str) -> int:
        """Resolves a class given by name or index (an int-like string that is
        not itself a class name counts as an index)."""
        if isinstance(c, bool):
            raise UnknownClassError(f"class {c!r} is neither a class name nor an index")
        if isinstance(c, str):
            if c in self.class_names:
                return self.class_names.index(c)
            if c.strip().lstrip("-").isdigit():
                c = int(c)
            else:
                raise UnknownClassError(
                    f"unknown class '{c}' for model {self.name or self.arch}; "
                    f"it has {_preview(self.class_names)}"
                )
        if isinstance(c, int) and 0 <= c < len(self.class_names):
            return c
        raise UnknownClassError(
            f"class index {c} is out of range for model {self.name or self.arch} "
            f"({len(self.class_names)} classes)"
        )

    def class_indices(self, classes) -> list[int]:
        idx = [self.class_index(c) for c in classes]
        if not idx:
            raise UnknownClassError("no classes were given")
        if len(set(idx)) != len(idx):
            raise UnknownClassError(f"a class is listed twice: {list(classes)}")
        return idx


def _preview(names: list[str], n: int = 12) -> str:
    shown = ", ".join(names[:n])
    return f"[{shown}{', ...' if len(names) > n else ''}]"


def example_input(spec: InputSpec, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, *spec.shape, generator=g)


def source_from_module(
    module: nn.Module, spec: InputSpec, class_names: list[str], arch: str = "module", name: str = ""
) -> SourceModel:
    graph = capture(module.eval(), example_input(spec))
    return _checked(SourceModel(graph, spec, list(class_names), arch, name))


def load_source_model(
    path: str | Path, arch: str, class_names: list[str], spec: InputSpec, name: str = ""
) -> SourceModel:
    """Reads a classifier file without unpickling anything.

    arch: a registry name (the file is a state_dict for it), "exported" (a
    torch.export program, `.pt2`) or "torchscript"."""
    from lego_core.architectures import ARCHITECTURES, load_state_dict_file

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    class_names = [str(c) for c in class_names]
    if not class_names:
        raise ModelFileError("class_names must not be empty")
    if len(set(class_names)) != len(class_names):
        raise ModelFileError("class_names must be unique")
    if arch in ARCHITECTURES:
        module = load_state_dict_file(path, arch, len(class_names), spec)
        graph = capture(module, example_input(spec))
    elif arch == "exported":
        graph = capture(load_exported_program(path), example_input(spec))
    elif arch == "torchscript":
        graph = capture(load_torchscript_program(path, example_input(spec)), example_input(spec))
    else:
        choices = ", ".join((*ARCHITECTURES, *FILE_FORMATS))
        raise ModelFileError(f"unknown arch '{arch}'; choose one of {choices}")
    return _checked(SourceModel(graph, spec, class_names, arch, name))


def _checked(model: SourceModel) -> SourceModel:
    n = model.graph.num_outputs
    if n != len(model.class_names):
        raise ModelFileError(
            f"the model outputs {n} classes but {len(model.class_names)} class names were given"
        )
    if not model.graph.layers():
        raise ModelFileError("the model has no conv or linear layer to locate components in")
    return model
