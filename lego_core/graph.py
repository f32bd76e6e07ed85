"""The captured computation graph that every other part of lego_core works on.

A classifier of any origin (a registry architecture, an uploaded state_dict, a
torch.export ExportedProgram or a TorchScript file) is captured once with
torch.export into an ATen-level graph. `LegoGraph` keeps that graph as a flat,
topologically ordered list of `Node`s whose arguments reference other nodes'
values and named parameters. The graph is executed by `GraphNet`, an
nn.Module that calls the captured ATen ops; disassembly and assembly only swap
the parameter tensors and a few channel-count arguments, so a pruned or merged
network runs through the very same code path as its source.

Channel semantics: every node gets a `kind` that says how it treats the channel
axis, which is what locating and pruning need to know. The channel axis of
a value is `Node.channel_dim` (1 for NCHW maps and [B, F] features; the last
axis for channels-last maps):

- conv / linear: the located layers; they consume one channel space and
  produce a new one (depthwise convs pass their space through). A linear layer
  over the last axis of a channels-last map ([B, H, W, C], or [B, N, C]) is a
  1x1 conv: its input features are channels and its outputs new channels;
- bn, pass: per-channel ops (activations, pooling, dropout, spatial means);
- permute: moves the channel axis (NCHW <-> NHWC), keeping the batch first;
- norm: layer norm over the channel axis. Each output channel is an affine map
  of its own input channel, but through a mean and variance over all channels,
  so removing any input channel changes every output: its input channels are
  kept whole (pruning them would not be exact);
- tie: element-wise binary ops between two feature maps (residual add, SE
  multiply): both operands share one channel space;
- cat: concatenation along channels; flatten: [B, C, H, W] -> [B, C*H*W];
- getitem: element 0 of a tuple-valued op (e.g. batch norm variants);
- scalar: size queries and other non-tensor values;
- opaque: anything else. Opaque ops are executed as captured, and every
  channel space that touches one is kept whole, which is always correct.
"""

from __future__ import annotations

import contextlib
import operator
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lego_core.errors import ModelFileError

aten = torch.ops.aten

# Pass ops that pool over the two spatial axes of an NCHW map.
_SPATIAL_TARGETS = {
    aten.max_pool2d.default,
    aten.avg_pool2d.default,
    aten.adaptive_avg_pool2d.default,
    aten.adaptive_max_pool2d.default,
    aten.max_pool2d_with_indices.default,
    aten._adaptive_avg_pool2d.default,
}
# Pass ops that reduce over the axes they are given (never the batch or channels).
_REDUCE_TARGETS = {aten.mean.dim, aten.amax.default, aten.sum.dim_IntList}
# Per-channel unary ops: the output's channel c depends only on input channel c.
_PASS_TARGETS = {
    aten.relu.default,
    aten.relu_.default,
    aten.hardtanh.default,
    aten.hardtanh_.default,
    aten.relu6.default,
    aten.gelu.default,
    aten.silu.default,
    aten.silu_.default,
    aten.sigmoid.default,
    aten.tanh.default,
    aten.hardswish.default,
    aten.hardswish_.default,
    aten.hardsigmoid.default,
    aten.leaky_relu.default,
    aten.leaky_relu_.default,
    aten.elu.default,
    aten.dropout.default,
    aten.dropout_.default,
    aten.clone.default,
    aten.contiguous.default,
    *_SPATIAL_TARGETS,
    *_REDUCE_TARGETS,
    aten.mul.Scalar,
    aten.div.Scalar,
    aten.add.Scalar,
    aten.sub.Scalar,
    aten.clamp.default,
    aten.clamp_min.default,
    aten.alias.default,
    aten.detach.default,
}
_TIE_TARGETS = {
    aten.add.Tensor,
    aten.add_.Tensor,
    aten.mul.Tensor,
    aten.mul_.Tensor,
    aten.sub.Tensor,
    aten.div.Tensor,
}
# Captured in-place ops are run out of place (readers of the mutated tensor are
# re-pointed at the result), so executing a graph never mutates its input.
_OUT_OF_PLACE = {
    aten.relu_.default: aten.relu.default,
    aten.hardtanh_.default: aten.hardtanh.default,
    aten.silu_.default: aten.silu.default,
    aten.hardswish_.default: aten.hardswish.default,
    aten.leaky_relu_.default: aten.leaky_relu.default,
    aten.dropout_.default: aten.dropout.default,
    aten.add_.Tensor: aten.add.Tensor,
    aten.mul_.Tensor: aten.mul.Tensor,
}
_FLATTEN_TARGETS = {
    aten.flatten.using_ints,
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.squeeze.default,
}
_CONV_TARGETS = {aten.conv2d.default, aten.convolution.default}
_BN_TARGETS = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default}
_SKIP_TARGETS = {
    aten._assert_scalar.default,
    aten.sym_constrain_range_for_size.default,
    aten._assert_tensor_metadata.default,
}


@dataclass(frozen=True)
class Ref:
    """An argument that is the value of another node."""

    name: str


@dataclass(frozen=True)
class Param:
    """An argument that is a named parameter or buffer of the graph."""

    key: str


@dataclass
class Node:
    name: str
    kind: str
    target: Any = None  # the ATen op; None for the input node
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    shape: tuple[int, ...] | None = None  # output shape without the batch dim; None if not a tensor
    layer: str | None = None  # conv/linear: the layer's name (its weight key without ".weight")
    channel_dim: int = 1  # the channel axis of the output, counting the batch as 0

    @property
    def channels(self) -> int | None:
        return self.shape[self.channel_dim - 1] if self.shape else None

    def refs(self) -> list[str]:
        """Names of the nodes whose values this node reads, in argument order."""
        out: list[str] = []
        _walk(self.args, lambda a: out.append(a.name) if isinstance(a, Ref) else None)
        _walk(
            tuple(self.kwargs.values()),
            lambda a: out.append(a.name) if isinstance(a, Ref) else None,
        )
        return out

    def params(self) -> list[str]:
        out: list[str] = []
        _walk(self.args, lambda a: out.append(a.key) if isinstance(a, Param) else None)
        return out

    # Accessors for the canonical layouts of conv / linear / bn arguments.
    def weight_key(self) -> str:
        return self.args[1].key

    def bias_key(self) -> str | None:
        b = self.args[2] if len(self.args) > 2 else None
        return b.key if isinstance(b, Param) else None

    def conv_options(self) -> tuple[tuple, tuple, tuple, int]:
        """stride, padding, dilation, groups of a conv node."""
        a = self.args
        if self.target is aten.convolution.default:
            return tuple(a[3]), tuple(a[4]), tuple(a[5]), int(a[8])
        stride = tuple(a[3]) if len(a) > 3 else (1, 1)
        padding = a[4] if len(a) > 4 else (0, 0)
        dilation = tuple(a[5]) if len(a) > 5 else (1, 1)
        groups = int(a[6]) if len(a) > 6 else 1
        if isinstance(padding, str):
            raise ModelFileError(f"conv {self.layer}: string padding '{padding}' is not supported")
        return _pair(stride), _pair(tuple(padding)), _pair(dilation), groups


def _max_along(
    x: torch.Tensor, dim: int, taps: int, stride: int, pad: int, dilation: int, out: int
):
    """Max pooling along one axis: for output o, the maximum over taps i of
    x[o * stride + i * dilation - pad]. Positions outside x are padding (-inf), which
    never wins, so each tap is taken over the outputs it reads inside x only: no
    padded copy of x is made."""
    n = x.shape[dim]
    full, fresh, partial = None, False, []
    for i in range(taps):
        first = i * dilation - pad  # the position output 0 reads through tap i
        lo = 0 if first >= 0 else (-first + stride - 1) // stride
        hi = min(out - 1, (n - 1 - first) // stride)
        if hi < lo:
            continue
        index = [slice(None)] * x.dim()
        index[dim] = slice(first + lo * stride, first + hi * stride + 1, stride)
        source = x[tuple(index)]
        if lo == 0 and hi == out - 1:
            fresh = full is not None  # a maximum of two taps is a new tensor
            full = source if full is None else torch.maximum(full, source)
        else:
            partial.append((lo, source))
    if full is None:
        shape = list(x.shape)
        shape[dim] = out
        result = x.new_full(shape, float("-inf"))
    else:
        result = full if fresh else full.clone()  # never write into x
    for lo, source in partial:
        target = result.narrow(dim, lo, source.shape[dim])
        torch.maximum(target, source, out=target)
    return result


def max_pool2d_values(x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    """aten.max_pool2d_with_indices with element 0 only (the values), computed as a
    maximum over strided row slices, then over column slices. Same values; on CPU,
    NCHW max pooling runs several times slower than these few elementwise maxima
    (12 ms against about 1.5 ms for a 256 x 24 x 16 x 16 input, 3x3, stride 2)."""
    if ceil_mode:
        return aten.max_pool2d_with_indices.default(
            x, kernel_size, stride, padding, dilation, ceil_mode
        )
    kh, kw = _pair(_ints(kernel_size))
    sh, sw = _pair(_ints(stride)) if _ints(stride) else (kh, kw)
    ph, pw = _pair(_ints(padding))
    dh, dw = _pair(_ints(dilation))
    h, w = x.shape[-2:]
    out_h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    rows = _max_along(x, x.dim() - 2, kh, sh, ph, dh, out_h)
    return (_max_along(rows, x.dim() - 1, kw, sw, pw, dw, out_w).contiguous(),)


def max_pool2d_fast(x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    """aten.max_pool2d, computed as `max_pool2d_values` (ATen's CPU kernel takes about
    15% of resnet18's forward pass at 32 px; the maxima a fraction of that)."""
    return max_pool2d_values(x, kernel_size, stride, padding, dilation, ceil_mode)[0]


_PASS_TARGETS.update((max_pool2d_values, max_pool2d_fast))
_SPATIAL_TARGETS.update((max_pool2d_values, max_pool2d_fast))


def _ints(v) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (list, tuple)) else (v,)


def _pair(v) -> tuple[int, int]:
    v = tuple(v)
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def _walk(obj, fn) -> None:
    if isinstance(obj, (list, tuple)):
        for o in obj:
            _walk(o, fn)
    else:
        fn(obj)


def _map(obj, fn):
    if isinstance(obj, list):
        return [_map(o, fn) for o in obj]
    if isinstance(obj, tuple):
        return tuple(_map(o, fn) for o in obj)
    return fn(obj)


@dataclass
class LegoGraph:
    """A captured classifier: nodes in topological order plus named tensors."""

    nodes: list[Node]
    tensors: dict[str, torch.Tensor]
    input_name: str
    output_name: str

    def __post_init__(self) -> None:
        self.by_name = {n.name: n for n in self.nodes}
        self.consumers: dict[str, list[str]] = {n.name: [] for n in self.nodes}
        for n in self.nodes:
            for r in n.refs():
                self.consumers[r].append(n.name)

    def layers(self) -> list[Node]:
        """The located layers (conv and linear) in execution order."""
        return [n for n in self.nodes if n.kind in ("conv", "linear")]

    def node(self, name: str) -> Node:
        return self.by_name[name]

    @property
    def num_outputs(self) -> int:
        return self.by_name[self.output_name].shape[0]

    def with_tensors(self, tensors: dict[str, torch.Tensor], nodes: list[Node] | None = None):
        return LegoGraph(nodes or self.nodes, tensors, self.input_name, self.output_name)

    def param_count(self) -> int:
        """Elements of every parameter and buffer the graph's nodes read (weights,
        biases, norm scales and running statistics, constants), each counted once."""
        keys: set[str] = set()
        for n in self.nodes:
            _walk(n.args, lambda a: keys.add(a.key) if isinstance(a, Param) else None)
            _walk(
                tuple(n.kwargs.values()),
                lambda a: keys.add(a.key) if isinstance(a, Param) else None,
            )
        return sum(self.tensors[k].numel() for k in keys)


class GraphNet(nn.Module):
    """Executes a LegoGraph. Optionally calls `hook(node, input_value)` before
    every located layer, which is how contributions are collected."""

    def __init__(self, graph: LegoGraph, taps: tuple[str, ...] = ()):
        super().__init__()
        self.graph = graph
        # Values (node names) returned beside the output, for a decision stage
        # that reads what the network computes on the way.
        self.taps = tuple(taps)
        self._buffer_names: dict[str, str] = {}
        for i, (key, t) in enumerate(graph.tensors.items()):
            name = f"t{i}"
            self.register_buffer(name, t, persistent=True)
            self._buffer_names[key] = name
        self.hook = None
        # The values whose last reader is each node, freed once it has run, so a
        # forward pass holds only the live values, not every intermediate.
        last: dict[str, int] = {}
        for i, node in enumerate(graph.nodes):
            for r in node.refs():
                last[r] = i
        self._free_after: list[list[str]] = [[] for _ in graph.nodes]
        for name, i in last.items():
            if name != graph.output_name and name not in self.taps:
                self._free_after[i].append(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env: dict[str, Any] = {self.graph.input_name: x}
        hook = self.hook
        free_after = self._free_after

        def resolve(a):
            if isinstance(a, Ref):
                return env[a.name]
            if isinstance(a, Param):
                return getattr(self, self._buffer_names[a.key])
            return a

        for i, node in enumerate(self.graph.nodes):
            if node.kind == "input":
                continue
            if hook is not None and node.kind in ("conv", "linear"):
                hook(node, env[node.args[0].name])
            if node.kind == "flatten":
                env[node.name] = torch.flatten(env[node.args[0].name], 1)
            else:
                args = _map(node.args, resolve)
                kwargs = {k: _map(v, resolve) for k, v in node.kwargs.items()}
                env[node.name] = node.target(*args, **kwargs)
            for name in free_after[i]:
                env.pop(name, None)
        if self.taps:
            return env[self.graph.output_name], [env[t] for t in self.taps]
        return env[self.graph.output_name]


# ---------------------------------------------------------------------------
# Capture


_unpickle_lock = threading.Lock()


@contextlib.contextmanager
def _refuse_unpickling():
    """torch.export.load falls back to full unpickling for some archive members;
    an uploaded file must never run code, so force weights_only there."""
    import pickle

    from torch.export.pt2_archive import _package

    real_load = torch.load

    def safe_load(*args, **kwargs):
        kwargs["weights_only"] = True
        return real_load(*args, **kwargs)

    class _NoPickle:
        def __getattr__(self, name):
            if name in ("loads", "load"):
                raise ModelFileError("the exported program contains pickled objects")
            return getattr(pickle, name)

    with _unpickle_lock:
        torch.load = safe_load
        real_pickle = _package.pickle
        _package.pickle = _NoPickle()
        real_c_load = torch._C._pickle_load_obj
        torch._C._pickle_load_obj = lambda *a, **k: (_ for _ in ()).throw(
            ModelFileError("the exported program contains pickled objects")
        )
        try:
            yield
        finally:
            torch.load = real_load
            _package.pickle = real_pickle
            torch._C._pickle_load_obj = real_c_load


def load_exported_program(path) -> torch.export.ExportedProgram:
    """Reads a torch.export archive without ever unpickling arbitrary objects."""
    try:
        with _refuse_unpickling(), open(path, "rb") as f:
            return torch.export.load(f)
    except ModelFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure means "not an exported program"
        raise ModelFileError(f"not a readable torch.export program: {_short(exc)}") from None


def load_torchscript_program(path, example: torch.Tensor) -> torch.export.ExportedProgram:
    """Reads a TorchScript file (its own safe format) and converts it to an
    ExportedProgram, so it joins the same graph path as everything else."""
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # noqa: BLE001
        raise ModelFileError(f"not a readable TorchScript file: {_short(exc)}") from None
    try:
        from torch._export.converter import TS2EPConverter

        with torch.no_grad():
            return TS2EPConverter(module.eval(), (example,)).convert()
    except Exception as exc:  # noqa: BLE001
        raise ModelFileError(
            "torch could not convert this TorchScript model into a graph "
            f"(torch._export.converter: {_whole(exc)}). Upload the model as a torch.export "
            "program instead: torch.export.save(torch.export.export(model.eval(), (x,), "
            "dynamic_shapes=({0: torch.export.Dim('batch')},)), 'model.pt2') with x a batch "
            "of inputs, then choose the 'exported' format"
        ) from None


def export_module(module: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """torch.export with a dynamic batch dimension."""
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    try:
        with torch.no_grad():
            return torch.export.export(module.eval(), (example,), dynamic_shapes=({0: batch},))
    except Exception as exc:  # noqa: BLE001
        raise ModelFileError(
            f"model could not be captured with torch.export: {_short(exc)}"
        ) from None


def _whole(exc: BaseException, limit: int = 600) -> str:
    """The whole message of `exc` on one line (torch's messages span lines)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    text = text or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def capture(program: torch.export.ExportedProgram | nn.Module, example: torch.Tensor) -> LegoGraph:
    """Turns a module or an ExportedProgram into a LegoGraph and classifies its
    nodes by running it once on `example` (a batch of normalised inputs)."""
    if isinstance(program, nn.Module):
        program = export_module(program, example)
    fixed_batch = _fixed_batch(program)
    example = _example_for(program, example)
    gm = program.module()
    nodes: list[Node] = []
    tensors: dict[str, torch.Tensor] = {}
    alias: dict[str, str] = {}  # fx node name -> our value name (in-place ops rebind)
    input_name = output_name = None

    def convert_arg(a):
        if isinstance(a, torch.fx.Node):
            return Ref(alias.get(a.name, a.name))
        return a

    for fx in gm.graph.nodes:
        if fx.op == "get_attr":
            t = _get_attr(gm, fx.target)
            if not isinstance(t, torch.Tensor):
                raise ModelFileError(f"unsupported attribute '{fx.target}' in the graph")
            tensors[fx.target] = t.detach().clone()
            alias[fx.name] = f"@{fx.target}"
        elif fx.op == "placeholder":
            if input_name is not None:
                raise ModelFileError("the model must take exactly one image tensor input")
            input_name = fx.name
            nodes.append(Node(fx.name, "input"))
        elif fx.op == "call_module":
            continue  # torch.export's guard function; it checks shapes only
        elif fx.op == "call_function":
            if fx.target in _SKIP_TARGETS:
                continue
            args = _map(tuple(fx.args), convert_arg)
            kwargs = {k: _map(v, convert_arg) for k, v in fx.kwargs.items()}
            args = _map(
                args,
                lambda a: Param(a.name[1:]) if isinstance(a, Ref) and a.name.startswith("@") else a,
            )
            kwargs = {
                k: _map(
                    v,
                    lambda a: (
                        Param(a.name[1:]) if isinstance(a, Ref) and a.name.startswith("@") else a
                    ),
                )
                for k, v in kwargs.items()
            }
            target = _OUT_OF_PLACE.get(fx.target, fx.target)
            if target is aten.max_pool2d_with_indices.default and all(
                u.target is operator.getitem and u.args[1] == 0 for u in fx.users
            ):
                target = max_pool2d_values  # nobody reads the indices
            elif target is aten.max_pool2d.default:
                target = max_pool2d_fast
            args = _inference_args(target, args)
            node = Node(fx.name, "pending", target, args, kwargs)
            nodes.append(node)
            if fx.target in _OUT_OF_PLACE and fx.args and isinstance(fx.args[0], torch.fx.Node):
                # Later readers of the mutated tensor must see the result.
                alias[fx.args[0].name] = fx.name
        elif fx.op == "output":
            outs = fx.args[0]
            outs = outs if isinstance(outs, (list, tuple)) else (outs,)
            if len(outs) != 1 or not isinstance(outs[0], torch.fx.Node):
                raise ModelFileError("the model must return exactly one logits tensor")
            output_name = alias.get(outs[0].name, outs[0].name)
    if input_name is None or output_name is None:
        raise ModelFileError("the graph has no input or no output")
    graph = LegoGraph(nodes, tensors, input_name, output_name)
    _prune_dead_nodes(graph)
    graph = LegoGraph(graph.nodes, tensors, input_name, output_name)
    _classify(graph, example)
    if fixed_batch is not None:
        _free_the_batch(graph, fixed_batch)
        _check_any_batch(graph, example, fixed_batch)
    return graph


def _fixed_batch(program: torch.export.ExportedProgram) -> int | None:
    """The batch size a program was exported with, if it is fixed (not dynamic)."""
    for spec in program.graph_signature.input_specs:
        if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT:
            node = next(n for n in program.graph.nodes if n.name == spec.arg.name)
            val = node.meta.get("val")
            batch = val.shape[0] if val is not None and val.dim() > 0 else None
            return batch if isinstance(batch, int) else None
    return None


def _example_for(program: torch.export.ExportedProgram, example: torch.Tensor) -> torch.Tensor:
    """A program exported with a fixed batch size may have it baked into
    reshapes; probe it with that batch size so they are recognised (flattens
    then run batch-independently, other reshapes through `batch_sized`)."""
    batch = _fixed_batch(program)
    if batch is not None and batch != example.shape[0]:
        reps = -(-batch // example.shape[0])
        return example.repeat(reps, *([1] * (example.dim() - 1)))[:batch]
    return example


_SIZED_TARGETS = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.expand.default,
}


def batch_sized(x: torch.Tensor, size, like: torch.Tensor, op):
    """`op(x, size)` with the batch size baked into size[0] replaced by the batch
    size of `like` (the graph's input): a reshape or expand of a program exported
    with a fixed batch, made to run at any batch."""
    return op(x, [like.shape[0], *size[1:]])


def _free_the_batch(graph: LegoGraph, batch: int) -> None:
    """Rewrites the reshapes and expands whose first size is the fixed export batch
    (and that are not flattens, which already run at any batch) to `batch_sized`."""
    for node in graph.nodes:
        if node.target not in _SIZED_TARGETS or node.kind == "flatten" or len(node.args) < 2:
            continue
        size = node.args[1]
        if isinstance(size, (list, tuple)) and size and size[0] == batch and node.shape:
            node.args = (node.args[0], list(size), Ref(graph.input_name), node.target)
            node.target = batch_sized
    graph.__post_init__()  # the input has new readers


def _check_any_batch(graph: LegoGraph, example: torch.Tensor, batch: int) -> None:
    """A program exported with a fixed batch must give the same logits per sample
    at another batch size; if a size still depends on the batch, say what to do."""
    other = example[:1] if batch > 1 else example.repeat(2, *([1] * (example.dim() - 1)))
    advice = (
        f"the program was exported with a fixed batch size of {batch}, and some of its "
        "operations depend on it. Export it with a dynamic batch dimension: "
        "torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim('batch')},)), "
        "or save it with torch.jit.script / torch.jit.trace and upload the TorchScript file"
    )
    net = GraphNet(graph)
    try:
        with torch.no_grad():
            fixed, free = net(example), net(other)
    except Exception as exc:  # noqa: BLE001
        raise ModelFileError(f"{advice} ({_short(exc)})") from None
    n = min(fixed.shape[0], free.shape[0])
    if free.shape[0] != other.shape[0] or not torch.allclose(
        fixed[:n], free[:n], rtol=1e-4, atol=1e-4
    ):
        raise ModelFileError(advice)


def _inference_args(target, args: tuple) -> tuple:
    """A program exported in training mode still classifies in eval mode:
    batch norm uses its running statistics and dropout is off."""
    if target is aten.batch_norm.default and len(args) > 5 and args[5] is not False:
        return (*args[:5], False, *args[6:])
    if target is aten.dropout.default and len(args) > 2 and args[2] is not False:
        return (*args[:2], False, *args[3:])
    return args


def _get_attr(gm: nn.Module, target: str):
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _prune_dead_nodes(graph: LegoGraph) -> None:
    needed = {graph.output_name}
    for n in reversed(graph.nodes):
        if n.name in needed:
            needed.update(n.refs())
    graph.nodes[:] = [n for n in graph.nodes if n.name in needed or n.kind == "input"]
    used = {k for n in graph.nodes for k in n.params()}
    for k in list(graph.tensors):
        if k not in used:
            del graph.tensors[k]


def _classify(graph: LegoGraph, example: torch.Tensor) -> None:
    """Runs the graph once to learn every value's shape, then sets node kinds."""
    values: dict[str, Any] = {}

    def record(node: Node, value) -> None:
        values[node.name] = value
        node.shape = (
            tuple(value.shape[1:]) if isinstance(value, torch.Tensor) and value.dim() >= 1 else None
        )

    net = GraphNet(graph)
    env_probe: dict[str, Any] = {graph.input_name: example}

    def resolve(a):
        if isinstance(a, Ref):
            return env_probe[a.name]
        if isinstance(a, Param):
            return graph.tensors[a.key]
        return a

    with torch.no_grad():
        record(graph.node(graph.input_name), example)
        for node in graph.nodes:
            if node.kind == "input":
                continue
            args = _map(node.args, resolve)
            kwargs = {k: _map(v, resolve) for k, v in node.kwargs.items()}
            try:
                out = node.target(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001
                raise ModelFileError(
                    f"the model does not run on inputs of shape {tuple(example.shape[1:])}: "
                    f"{_short(exc)}"
                ) from None
            env_probe[node.name] = out
            if isinstance(out, (tuple, list)):
                values[node.name] = out
                first = out[0] if out and isinstance(out[0], torch.Tensor) else None
                node.shape = tuple(first.shape[1:]) if first is not None else None
            else:
                record(node, out)
    del net

    param_users: dict[str, int] = {}
    for n in graph.nodes:
        for k in n.params():
            param_users[k] = param_users.get(k, 0) + 1

    batch = example.shape[0]
    for node in graph.nodes:
        if node.kind == "input":
            continue
        node.kind, node.channel_dim = _kind_of(node, graph, values, param_users, batch)
        if node.kind in ("conv", "linear"):
            key = node.weight_key()
            node.layer = key[: -len(".weight")] if key.endswith(".weight") else key
    out = graph.node(graph.output_name)
    if out.shape is None or len(out.shape) != 1:
        raise ModelFileError("the model must return logits of shape [batch, classes]")


def _kind_of(node: Node, graph: LegoGraph, values, param_users, batch: int) -> tuple[str, int]:
    """The node's kind and the channel axis of its output (see the module docstring)."""
    t = node.target
    out = values.get(node.name)
    tensor_refs = [r for r in node.refs() if isinstance(values.get(r), torch.Tensor)]
    if not isinstance(out, torch.Tensor) and not isinstance(out, (tuple, list)):
        return "scalar", 1
    if isinstance(out, torch.Tensor) and out.dim() >= 1 and out.shape[0] != batch:
        return "opaque", 1

    def own_params_ok(*positions) -> bool:
        for p in positions:
            arg = node.args[p] if p < len(node.args) else None
            if isinstance(arg, Param) and param_users[arg.key] != 1:
                return False
        return True

    def channel_dim(ref: str) -> int:
        return graph.node(ref).channel_dim

    if t in _CONV_TARGETS:
        a = node.args
        if (
            isinstance(a[0], Ref)
            and channel_dim(a[0].name) == 1
            and isinstance(a[1], Param)
            and own_params_ok(1, 2)
            and (len(a) <= 2 or a[2] is None or isinstance(a[2], Param))
            and graph.tensors[a[1].key].dim() == 4
            and not (t is aten.convolution.default and (a[6] or any(a[7])))
        ):
            return "conv", 1
        return "opaque", 1
    if t is aten.linear.default:
        a = node.args
        if (
            isinstance(a[0], Ref)
            and isinstance(a[1], Param)
            and own_params_ok(1, 2)
            and (len(a) <= 2 or a[2] is None or isinstance(a[2], Param))
            and values[a[0].name].dim() >= 2
            and channel_dim(a[0].name) == values[a[0].name].dim() - 1
        ):
            # [B, F] features, or a channels-last map: a 1x1 conv over its last axis.
            return "linear", out.dim() - 1
        return "opaque", 1
    if t in _BN_TARGETS:
        if (
            tensor_refs
            and channel_dim(tensor_refs[0]) == 1
            and all(isinstance(a, Param) or a is None for a in node.args[1:5])
            and own_params_ok(1, 2, 3, 4)
        ):
            return "bn", 1
        return "opaque", 1
    if (
        t is aten.layer_norm.default
        and len(tensor_refs) == 1
        and node.args[0] == Ref(tensor_refs[0])
    ):
        src = values[tensor_refs[0]]
        shape = list(node.args[1]) if len(node.args) > 1 else []
        if (
            src.dim() >= 2
            and channel_dim(tensor_refs[0]) == src.dim() - 1
            and shape == [src.shape[-1]]
            and own_params_ok(2, 3)
        ):
            return "norm", src.dim() - 1
        return "opaque", 1
    if t is aten.permute.default and len(tensor_refs) == 1:
        dims = [d % values[tensor_refs[0]].dim() for d in node.args[1]]
        if dims[0] == 0:
            return "permute", dims.index(channel_dim(tensor_refs[0]))
        return "opaque", 1
    if t is operator.getitem:
        if node.args[1] == 0 and node.refs():
            return "getitem", channel_dim(node.refs()[0])
        return "opaque", 1
    if t is aten.cat.default:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        parts = node.args[0]
        if all(isinstance(p, Ref) for p in parts):
            dims = {channel_dim(p.name) for p in parts}
            if len(dims) == 1 and dim % out.dim() == dims.pop() and dim % out.dim() != 0:
                return "cat", dim % out.dim()
        return "opaque", 1
    if t in _FLATTEN_TARGETS and len(tensor_refs) == 1:
        src = values[tensor_refs[0]]
        if (
            src.dim() >= 2
            and out.dim() == 2
            and out.shape[1] == src[0].numel()
            and channel_dim(tensor_refs[0]) == 1
        ):
            return "flatten", 1  # channel-major: channel c becomes consecutive features
        return "opaque", 1
    if t in _TIE_TARGETS:
        if len(tensor_refs) == 2 and not node.params():
            a, b = (values[r] for r in tensor_refs)
            d = channel_dim(tensor_refs[0])
            if (
                channel_dim(tensor_refs[1]) == d
                and a.dim() == b.dim() == out.dim() >= 2
                and a.shape[d] == b.shape[d] == out.shape[d]
            ):
                return "tie", d
        if len(tensor_refs) == 1 and not node.params():
            return "pass", channel_dim(tensor_refs[0])  # tensor with a Python scalar
        return "opaque", 1
    if t in _PASS_TARGETS and tensor_refs and not node.params():
        src = values[tensor_refs[0]]
        d = channel_dim(tensor_refs[0])
        first = out[0] if isinstance(out, (tuple, list)) else out
        if t in _SPATIAL_TARGETS and d != 1:
            return "opaque", 1  # pooling a channels-last map would pool over channels
        if t in _REDUCE_TARGETS:
            dims = node.args[1] if len(node.args) > 1 else []
            dims = {x % src.dim() for x in (dims if isinstance(dims, (list, tuple)) else [dims])}
            keepdim = bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim"))
            if not dims or 0 in dims or d in dims:
                return "opaque", 1
            if not keepdim:
                d -= sum(1 for x in dims if x < d)
        if (
            src.dim() >= 2
            and first.dim() > d
            and first.shape[d] == src.shape[channel_dim(tensor_refs[0])]
        ):
            return "pass", d
    return "opaque", 1
