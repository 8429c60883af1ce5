"""Which units of which layers are tied together: trace the model, propagate shapes, follow the channel dim.

Every output unit of a ``Conv2d`` (filter) or ``Linear`` (feature) that the traced forward pass calls
gets an id. Walking the graph, each tensor with a channel dimension carries a *slot* array: the unit id
behind each of its channels, and which dim holds them (1 for ``[N, C, H, W]``, the last one after a
``permute`` to channels-last or a ``Linear`` on ``[..., C]``). Channel-preserving ops (BatchNorm,
activations, pooling, dropout, spatial reductions, ``expand``) pass slots through; ``permute`` /
``transpose`` move the channel dim; ``view`` / ``reshape`` / ``flatten`` / ``unsqueeze`` follow the
channels through the memory order (``flatten`` from ``[N, C, H, W]`` repeats each slot ``H*W`` times,
``view(b, c, 1, 1)`` of a squeeze-excitation gate maps them one to one) as long as the size at the
channel position is not a hard-coded number (``x.size(1)``, a size unpacked from ``x.shape`` or ``-1``
follow the pruned channels; ``view(-1, 1234)`` cannot, and pins them); ``LayerNorm`` over the channels
of a channels-last tensor is resized (it renormalises over the kept channels);
``cat`` on the channel dim concatenates them; element-wise ``add``/``mul``/... of same-size tensors
*ties* the units channel by channel (union-find), as does a depthwise or grouped conv (whole groups).
Units that reach the model output, meet the model input or a constant, or enter an op this module does
not understand are *pinned*: they can never be removed, and the reason (naming the op and node) is kept
for the error message if someone asks to remove them.
"""

from __future__ import annotations

import copy
import difflib
import operator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from moco.compress.surgery.errors import SurgeryError

__all__ = ["Analysis", "ChannelGroup", "analyse", "dependency_groups"]


@dataclass(frozen=True)
class ChannelGroup:
    """Layers whose output units are tied: removing unit ``i`` of one removes unit ``i`` of all.

    Attributes:
        layers: qualified names of the ``Conv2d``/``Linear`` layers in the group, in forward order
            (e.g. ``("stem.0", "layer1.0.conv2", "layer1.1.conv2")`` for a residual stage), except that
            ``layers[0]`` is always a member whose unit ``i`` is the group's unit ``i``: naming it in
            ``apply(keep={layers[0]: indices in range(units)})`` prunes the whole group consistently.
        units: number of independent units of the group (the channel count of a residual stage).
        prunable: False when no unit of the group can be removed (e.g. the layer producing the model
            output, or one added to the model input), or when the units are tied across a ``cat`` so that
            no single member spans them (then name the members individually).
        reason: why units are pinned (empty when none is); names the op and node.
    """

    layers: tuple[str, ...]
    units: int
    prunable: bool
    reason: str = ""


@dataclass
class Producer:
    """A Conv2d/Linear layer whose output units can be kept or removed (one entry per module)."""

    name: str
    kind: str  # "Conv2d" or "Linear"
    units: int
    ids: np.ndarray
    order: int


@dataclass
class Call:
    """One call of a module whose parameters depend on channel counts (conv, linear, batch norm, PReLU)."""

    module: str
    node: str
    in_slots: np.ndarray | None  # unit ids behind the input channels
    grouped: bool = False


class _Units:
    """Union-find over unit ids, with pins (units that must stay) and the ops that tied units."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.pins: list[tuple[np.ndarray, str]] = []
        self.ties: list[tuple[np.ndarray, str]] = []

    def new(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, i: int) -> int:
        parent = self.parent
        root = int(i)
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(int(a)), self.find(int(b))
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def tie(self, a: np.ndarray, b: np.ndarray, reason: str) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            self.union(x, y)
        self.ties.append((np.asarray(a), reason))

    def pin(self, ids: np.ndarray, reason: str) -> None:
        if ids is not None and len(ids):
            self.pins.append((np.asarray(ids), reason))

    def roots(self, ids: np.ndarray) -> np.ndarray:
        return np.fromiter((self.find(int(i)) for i in ids), dtype=np.int64, count=len(ids))


@dataclass
class Analysis:
    """The traced model and its unit dependencies (internal to surgery; see :func:`dependency_groups`)."""

    model: nn.Module
    graph_module: fx.GraphModule
    producers: dict[str, Producer]
    calls: list[Call]
    units: _Units
    output_shapes: list[tuple[int, ...]]
    pinned: dict[int, str] = field(default_factory=dict)

    def pinned_reason(self, unit_id: int) -> str | None:
        """Why unit ``unit_id`` can never be removed, or None."""
        return self.pinned.get(self.units.find(int(unit_id)))

    def tie_reasons(self, root: int, limit: int = 3) -> list[str]:
        """The ops that tied units into the class ``root`` (at most ``limit``, in graph order)."""
        out: list[str] = []
        for ids, reason in self.units.ties:
            if reason not in out and any(self.units.find(int(i)) == root for i in ids):
                out.append(reason)
                if len(out) >= limit:
                    break
        return out


# ----------------------------------------------------------------------------------------- op tables

_PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.AlphaDropout, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Upsample, nn.ZeroPad2d,
    nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d, nn.MaxUnpool1d, nn.MaxUnpool2d,
)
_PASS_FUNCTIONS = {
    F.relu, torch.relu, F.relu_, torch.relu_, F.relu6, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.leaky_relu, F.softplus, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh,
    F.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout, F.max_pool1d, F.max_pool2d, F.avg_pool1d,
    F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
    F.interpolate, torch.abs, torch.exp, torch.neg, torch.clamp, torch.clip, torch.square, torch.sqrt,
    operator.neg, operator.pos,
    # return_indices=True: a (values, indices) pair, both with the input's channels (_Walker.passthrough)
    F.max_pool1d_with_indices, F.max_pool2d_with_indices, F.adaptive_max_pool1d_with_indices,
    F.adaptive_max_pool2d_with_indices,
}
_PASS_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous", "clone", "detach", "float", "double",
    "half", "to", "abs", "abs_", "neg", "exp", "clamp", "clamp_", "clip", "clip_", "square", "sqrt",
    "requires_grad_",
}
_ELEMENTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub, operator.imul,
    operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum,
}
_ELEMENTWISE_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum"}
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
_SOFTMAX_FUNCTIONS = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax}


def _label(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"{type(gm.get_submodule(node.target)).__name__} module {node.target!r} (node {node.name!r})"
    if node.op == "call_method":
        return f"tensor method .{node.target}() (node {node.name!r})"
    name = getattr(node.target, "__name__", str(node.target))
    return f"{name} (node {node.name!r})"


def _meta(arg) -> TensorMetadata | None:
    if isinstance(arg, fx.Node):
        meta = arg.meta.get("tensor_meta")
        if isinstance(meta, TensorMetadata):
            return meta
    return None


def _shape(arg) -> tuple[int, ...] | None:
    meta = _meta(arg)
    return tuple(int(s) for s in meta.shape) if meta is not None else None


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _nodes_in(value) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(value, lambda n: found.append(n) or n)
    return found


class _Walker:
    """One pass over the traced graph assigning slots, ties and pins."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.units = _Units()
        self.slots: dict[fx.Node, np.ndarray] = {}
        self.cdim: dict[fx.Node, int] = {}  # the channel dim of a node with slots (1 when absent)
        self.producers: dict[str, Producer] = {}
        self.calls: list[Call] = []
        self.output_shapes: list[tuple[int, ...]] = []
        self.pin_later: list[tuple[fx.Node, str]] = []
        self.items: dict[fx.Node, tuple[np.ndarray, int]] = {}  # a tuple of tensors that all carry these channels
        self.opaque_dims: dict[fx.Node, int] = {}  # an opaque op's tuple result: the channel dim of its items
        self.first_in: dict[str, np.ndarray] = {}  # module -> the input channels of its first call

    # -- helpers
    def call(self, module: str, node: fx.Node, in_slots: np.ndarray, grouped: bool = False) -> None:
        """Record a call of ``module`` on channels ``in_slots``. A module called again (weight sharing) has one
        set of input channels: the inputs of all its calls are tied, so one keep set fits every call."""
        first = self.first_in.setdefault(module, in_slots)
        if first is not in_slots and len(first) == len(in_slots):
            self.units.tie(first, in_slots, f"module {module!r} called more than once (node {node.name!r}): "
                           "every call reads the same input channels")
        self.calls.append(Call(module, node.name, in_slots, grouped=grouped))

    def dim_of(self, node: fx.Node) -> int:
        """The channel dim of ``node`` (1 unless a permute or a channels-last Linear moved it)."""
        return self.cdim.get(node, 1)

    def assign(self, node: fx.Node, ids: np.ndarray, dim: int = 1) -> None:
        self.slots[node] = ids
        if dim != 1:
            self.cdim[node] = dim
        else:
            self.cdim.pop(node, None)

    def fresh_pinned(self, node: fx.Node, reason: str, dim: int | None = None) -> None:
        """New pinned units for ``node``'s channels, in ``dim`` (default: the node's channel dim, 1 unless
        known; an opaque op passes its input's, so a token tensor ``[N, T, C]`` keeps its channels last)."""
        if dim is None:
            dim = self.dim_of(node)
        shape = _shape(node)
        if shape is not None and len(shape) >= 2 and dim < len(shape):
            ids = self.units.new(shape[dim])
            self.units.pin(ids, reason)
            self.assign(node, ids, dim)

    def _inherited_dim(self, node: fx.Node, rank: int | None) -> int:
        """The channel dim an opaque op's output most likely has: an input's explicit one (a channels-last
        tensor: tokens ``[N, T, C]`` after a Linear or a transpose) when it has the output's rank, else 1."""
        for arg in _nodes_in((node.args, node.kwargs)):
            if arg in self.cdim and (rank is None or len(_shape(arg) or ()) == rank):
                return self.cdim[arg]
        return 1

    def opaque(self, node: fx.Node, why: str = "", hint: str = "") -> None:
        """An op surgery cannot adjust: pin every unit flowing into it; its output channels are fixed."""
        label = _label(node, self.gm) + (f" {why}" if why else "")
        tail = ", which surgery cannot adjust" + (f" ({hint})" if hint else "")
        for arg in _nodes_in((node.args, node.kwargs)):
            if arg in self.slots:
                self.units.pin(self.slots[arg], f"they reach {label}{tail}")
        parts = node.meta.get("tensor_meta")
        if isinstance(parts, (tuple, list)) and parts and isinstance(parts[0], TensorMetadata):
            # a tuple result (nn.MultiheadAttention: (output, weights)): its items get the inherited dim
            self.opaque_dims[node] = self._inherited_dim(node, len(parts[0].shape))
            return
        shape = _shape(node)
        self.fresh_pinned(node, f"they are tied to the output of {label}{tail}",
                          self._inherited_dim(node, len(shape) if shape is not None else None))

    def passthrough(self, node: fx.Node, src) -> None:
        if not isinstance(src, fx.Node) or src not in self.slots:
            self.fresh_pinned(node, f"they are tied to the output of {_label(node, self.gm)}")
            return
        parts = node.meta.get("tensor_meta")
        if isinstance(parts, (tuple, list)) and parts and all(isinstance(m, TensorMetadata) for m in parts):
            # a (values, indices) pair (max pooling with return_indices=True): each part has the input's channels
            d, n, rank = self.dim_of(src), len(self.slots[src]), len(_shape(src) or ())
            if all(len(m.shape) == rank and int(m.shape[d]) == n for m in parts):
                self.items[node] = (self.slots[src], d)
                return
            self.opaque(node, "whose outputs do not keep the channel count")
            return
        out, d = _shape(node), self.dim_of(src)
        if out is None or len(out) != len(_shape(src) or ()) or out[d] != len(self.slots[src]):
            self.opaque(node, "that changes the channel count")
            return
        self.assign(node, self.slots[src], d)

    def reshaped(self, node: fx.Node, src, sizes=None) -> None:
        """A view/reshape/flatten/unsqueeze/squeeze: follow the channels through the memory order.

        Each per-sample element of ``src`` belongs to one channel; the output's channel dim is the first
        dim along which every slice belongs to one channel. ``sizes`` (the literal size arguments of a
        view/reshape, if any) must not hard-code the size at that position: it changes with pruning.
        """
        shape, out = _shape(src), _shape(node)
        if not isinstance(src, fx.Node) or src not in self.slots:
            return self.fresh_pinned(node, f"they are tied to the output of {_label(node, self.gm)}")
        if shape is None or out is None or len(out) < 2 or len(shape) < 2:
            return self.opaque(node)
        if out[0] != shape[0]:
            return self.opaque(node, "that merges the batch and channel dims")
        d = self.dim_of(src)
        axes = [len(self.slots[src]) if i == d else 1 for i in range(1, len(shape))]
        per_element = np.broadcast_to(self.slots[src].reshape(axes), shape[1:]).reshape(out[1:])
        for cd in range(1, len(out)):
            blocks = np.moveaxis(per_element, cd - 1, 0).reshape(out[cd], -1)
            if (blocks == blocks[:, :1]).all():
                break
        else:
            return self.opaque(node, "that mixes channels within one slice")
        if sizes is not None and len(sizes) == len(out):
            fixed = sizes[cd]
            if isinstance(fixed, int) and fixed != -1:
                return self.opaque(node, f"with the hard-coded size {fixed}",
                                   "use x.flatten(1), x.view(x.size(0), -1) or sizes unpacked from x.shape, "
                                   "so the size follows the channels")
        self.assign(node, np.ascontiguousarray(blocks[:, 0]), cd)

    def permute(self, node: fx.Node, src, dims) -> None:
        if not isinstance(src, fx.Node) or src not in self.slots:
            return self.fresh_pinned(node, f"they are tied to the output of {_label(node, self.gm)}")
        shape = _shape(src)
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = list(dims[0])
        if shape is None or not all(isinstance(i, int) for i in dims) or len(dims) != len(shape):
            return self.opaque(node)
        dims = [i % len(shape) for i in dims]
        if dims[0] != 0:
            return self.opaque(node, "that moves the batch dim")
        self.assign(node, self.slots[src], dims.index(self.dim_of(src)))

    def transpose(self, node: fx.Node, src, a, b) -> None:
        shape = _shape(src)
        if shape is None or not isinstance(a, int) or not isinstance(b, int):
            return self.opaque(node)
        dims = list(range(len(shape)))
        a, b = a % len(shape), b % len(shape)
        dims[a], dims[b] = dims[b], dims[a]
        self.permute(node, src, dims)

    def flatten(self, node: fx.Node, src, start: int, end: int) -> None:
        shape = _shape(src)
        if shape is None or src not in self.slots:
            self.passthrough(node, src)
            return
        if start % len(shape) == 0 and end % len(shape) != 0:
            return self.opaque(node, "that merges the batch and channel dims")
        self.reshaped(node, src)

    def elementwise(self, node: fx.Node, operands: list) -> None:
        out = _shape(node)
        if out is None or len(out) < 2:
            return self.opaque(node) if any(a in self.slots for a in operands if isinstance(a, fx.Node)) else None
        result, cd = None, None
        slotted = [a for a in operands if isinstance(a, fx.Node) and a in self.slots and _shape(a) is not None
                   and len(_shape(a)) == len(out) and _shape(a)[self.dim_of(a)] == out[self.dim_of(a)]]
        if slotted:
            cd = self.dim_of(slotted[0])
        for arg in operands:
            shape = _shape(arg)
            if shape is None:
                continue
            if len(shape) == len(out):
                if arg in slotted and self.dim_of(arg) != cd:
                    return self.opaque(node, "on operands whose channels lie in different dims")
                if shape[cd or 1] != out[cd or 1]:
                    continue  # broadcast along channels (size 1)
                ids = self.slots.get(arg)
                if ids is None:
                    continue
                if result is None:
                    result = ids
                else:
                    self.units.tie(result, ids, f"{_label(node, self.gm)} (residual add / element-wise op)")
            else:
                d = (cd or 1) - (len(out) - len(shape))
                if d >= 0 and shape[d] != 1:
                    self.pin_later.append((node, f"they are broadcast with a {tuple(shape)} tensor in "
                                                 f"{_label(node, self.gm)}, which surgery cannot slice"))
        if result is None:
            self.fresh_pinned(node, f"they are tied to the output of {_label(node, self.gm)}")
        else:
            self.assign(node, result, cd or 1)

    def reduce(self, node: fx.Node, src, dims, keepdim=False) -> None:
        shape = _shape(src)
        if shape is None or src not in self.slots:
            return self.passthrough(node, src)
        if dims is None:
            return self.opaque(node, "that reduces every dim")
        dims = [dims] if isinstance(dims, int) else list(dims)
        if not all(isinstance(d, int) for d in dims) or not isinstance(keepdim, bool):
            return self.opaque(node)
        dims = {d % len(shape) for d in dims}
        d = self.dim_of(src)
        if dims & {0, d}:
            return self.opaque(node, "that reduces the batch or channel dim")
        out_dim = d if keepdim else d - sum(1 for i in dims if i < d)
        if _shape(node) is None or _shape(node)[out_dim] != len(self.slots[src]):
            return self.opaque(node)
        self.assign(node, self.slots[src], out_dim)

    def cat(self, node: fx.Node, tensors, dim) -> None:
        out = _shape(node)
        tensors = list(tensors) if isinstance(tensors, (list, tuple)) else []
        if out is None or len(out) < 2 or not tensors or not isinstance(dim, int):
            return self.opaque(node)
        dim %= len(out)
        parts = []
        for t in tensors:
            if not isinstance(t, fx.Node) or t not in self.slots:
                return self.opaque(node, "with an operand of unknown channels")
            parts.append(self.slots[t])
        cds = {self.dim_of(t) for t in tensors}
        if len(cds) != 1:
            unknown = any(t not in self.cdim for t in tensors) and any(t in self.cdim for t in tensors)
            return self.opaque(node, "with an operand whose channel layout is unknown (a parameter such as a class "
                                     "token)" if unknown else "on operands whose channels lie in different dims")
        cd = cds.pop()
        if dim == cd:
            self.assign(node, np.concatenate(parts), cd)
        else:
            for p in parts[1:]:
                if len(p) != len(parts[0]):
                    return self.opaque(node)
                self.units.tie(parts[0], p, f"{_label(node, self.gm)} (cat along dim {dim})")
            self.assign(node, parts[0], cd)

    def softmax(self, node: fx.Node, src, dim) -> None:
        shape = _shape(src)
        if shape is None or src not in self.slots or not isinstance(dim, int):
            return self.opaque(node)
        if dim % len(shape) == self.dim_of(src):
            self.units.pin(self.slots[src], f"{_label(node, self.gm)} normalises over them")
        self.passthrough(node, src)

    def view(self, node: fx.Node, src, sizes) -> None:
        if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
            sizes = list(sizes[0])
        if len(sizes) == 1 and isinstance(sizes[0], fx.Node) and _shape(sizes[0]) is None:
            sizes = None  # x.view(y.shape) / x.view(y.size()): sizes that follow another tensor
        self.reshaped(node, src, sizes)

    def getitem(self, node: fx.Node, src, index) -> None:
        shape = _shape(src)
        if src in self.items and isinstance(index, int):  # one part of a (values, indices) pair
            ids, d = self.items[src]
            return self.assign(node, ids, d)
        if shape is None:  # indexing a tuple / list result
            return self.fresh_pinned(node, f"they are tied to the output of {_label(node, self.gm)}",
                                     self.opaque_dims.get(src) if isinstance(src, fx.Node) else None)
        idx = index if isinstance(index, tuple) else (index,)
        full = slice(None, None, None)
        keeps_channels = src in self.slots and self.dim_of(src) == 1 and len(shape) >= 2 and len(idx) >= 1 and (
            idx[0] == full and (len(idx) == 1 or idx[1] == full)
        )
        if keeps_channels and all(i is None for i in idx[2:]):
            return self.reshaped(node, src)  # x[:, :, None, None] and the like
        out = _shape(node)
        if keeps_channels and out is not None and len(out) >= 2 and out[1] == shape[1]:
            return self.assign(node, self.slots[src], 1)  # spatial slicing / indexing after the channels
        self.opaque(node, "that indexes the channel dim")

    # -- modules
    def module(self, node: fx.Node) -> None:
        mod = self.gm.get_submodule(node.target)
        src = node.args[0] if node.args else None
        in_shape = _shape(src)
        kind = type(mod)
        d = self.dim_of(src) if isinstance(src, fx.Node) else 1
        if kind is nn.Conv2d and in_shape is not None and len(in_shape) == 4 and d == 1:
            return self.producer(node, mod, src, "Conv2d")
        if kind is nn.Linear and in_shape is not None and len(in_shape) >= 2 and (
            d == len(in_shape) - 1 or src not in self.slots
        ):
            return self.producer(node, mod, src, "Linear")
        if kind is nn.LayerNorm and src in self.slots and in_shape is not None and d == len(in_shape) - 1 and tuple(
            mod.normalized_shape
        ) == (in_shape[-1],):
            self.call(node.target, node, self.slots[src])
            return self.passthrough(node, src)
        if kind in (nn.BatchNorm1d, nn.BatchNorm2d) or (kind is nn.PReLU and mod.num_parameters > 1):
            if src in self.slots and in_shape is not None and len(in_shape) >= 2 and d == 1:
                self.call(node.target, node, self.slots[src])
                return self.passthrough(node, src)
            return self.opaque(node)
        if kind is nn.PReLU or isinstance(mod, _PASS_MODULES):
            return self.passthrough(node, src)
        if kind is nn.Flatten:
            return self.flatten(node, src, mod.start_dim, mod.end_dim)
        if kind in (nn.Softmax, nn.LogSoftmax):
            return self.softmax(node, src, mod.dim if mod.dim is not None else 1)
        self.opaque(node)

    def producer(self, node: fx.Node, mod: nn.Module, src, kind: str) -> None:
        name = node.target
        units = mod.out_channels if kind == "Conv2d" else mod.out_features
        if name not in self.producers:
            self.producers[name] = Producer(name, kind, int(units), self.units.new(int(units)), len(self.producers))
        out_ids = self.producers[name].ids
        in_slots = self.slots.get(src)
        if in_slots is None:
            in_slots = self.units.new(_shape(src)[1 if kind == "Conv2d" else -1])
            self.units.pin(in_slots, f"they are tied to the input of {_label(node, self.gm)}")
        groups = getattr(mod, "groups", 1)
        if groups > 1:
            in_per, out_per = len(in_slots) // groups, units // groups
            reason = (f"{'depthwise' if in_per == 1 else 'grouped'} conv {name!r} (groups={groups}, node "
                      f"{node.name!r}), which keeps or removes whole groups")
            for g in range(groups):
                members = np.concatenate(
                    [in_slots[g * in_per : (g + 1) * in_per], out_ids[g * out_per : (g + 1) * out_per]]
                )
                self.units.tie(members[:-1], members[1:], reason)
        self.call(name, node, in_slots, grouped=groups > 1)
        self.assign(node, out_ids, 1 if kind == "Conv2d" else len(_shape(src)) - 1)

    # -- functions and methods
    def function(self, node: fx.Node) -> None:
        t, a = node.target, node.args
        if t in _PASS_FUNCTIONS:
            return self.passthrough(node, a[0] if a else None)
        if t in _ELEMENTWISE_FUNCTIONS:
            return self.elementwise(node, list(a[:2]) + [node.kwargs.get("other")])
        if t is torch.flatten:
            return self.flatten(node, a[0], _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))
        if t is torch.reshape:
            return self.view(node, a[0], [_arg(node, 1, "shape")])
        if t in _REDUCE_FUNCTIONS:
            return self.reduce(node, a[0], _arg(node, 1, "dim"), _arg(node, 2, "keepdim", False))
        if t is torch.permute:
            return self.permute(node, a[0], [_arg(node, 1, "dims")])
        if t is torch.transpose:
            return self.transpose(node, a[0], _arg(node, 1, "dim0"), _arg(node, 2, "dim1"))
        if t in (torch.unsqueeze, torch.squeeze):
            return self.reshaped(node, a[0])
        if t in _CAT_FUNCTIONS:
            return self.cat(node, _arg(node, 0, "tensors"), _arg(node, 1, "dim", 0))
        if t in _SOFTMAX_FUNCTIONS:
            return self.softmax(node, a[0], _arg(node, 1, "dim"))
        if t is operator.getitem:
            return self.getitem(node, a[0], a[1])
        if t is getattr:
            return None  # x.shape, x.dtype, ...
        if _shape(node) is None and not any(n in self.slots for n in _nodes_in((a, node.kwargs))):
            return None  # arithmetic on sizes (x.size(0) * 2) and the like
        self.opaque(node)

    def method(self, node: fx.Node) -> None:
        t, a = node.target, node.args
        if t in ("size", "dim", "numel") or (t == "shape"):
            return None
        if t in _PASS_METHODS:
            return self.passthrough(node, a[0])
        if t in _ELEMENTWISE_METHODS:
            return self.elementwise(node, list(a[:2]) + [node.kwargs.get("other")])
        if t == "flatten":
            return self.flatten(node, a[0], _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))
        if t in ("view", "reshape"):
            return self.view(node, a[0], list(a[1:]) or [node.kwargs.get("shape", node.kwargs.get("size"))])
        if t in ("view_as", "reshape_as"):
            return self.reshaped(node, a[0])
        if t in ("unsqueeze", "squeeze", "unsqueeze_", "squeeze_"):
            return self.reshaped(node, a[0])
        if t in ("expand", "expand_as"):
            return self.passthrough(node, a[0])
        if t == "permute":
            return self.permute(node, a[0], list(a[1:]) or [node.kwargs.get("dims")])
        if t == "transpose":
            return self.transpose(node, a[0], _arg(node, 1, "dim0"), _arg(node, 2, "dim1"))
        if t in _REDUCE_METHODS:
            return self.reduce(node, a[0], _arg(node, 1, "dim"), _arg(node, 2, "keepdim", False))
        if t in ("softmax", "log_softmax"):
            return self.softmax(node, a[0], _arg(node, 1, "dim"))
        self.opaque(node)

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.fresh_pinned(node, f"they are tied to the model input {node.name!r}")
            elif node.op == "get_attr":
                self.fresh_pinned(node, f"they are tied to the tensor attribute {node.target!r}, which surgery "
                                        f"cannot slice")
            elif node.op == "call_module":
                self.module(node)
            elif node.op == "call_function":
                self.function(node)
            elif node.op == "call_method":
                self.method(node)
            elif node.op == "output":
                for arg in _nodes_in(node.args):
                    if arg in self.slots:
                        self.units.pin(self.slots[arg], "they are the model output")
                    if _shape(arg) is not None:
                        self.output_shapes.append(_shape(arg))
        for node, reason in self.pin_later:
            if node in self.slots:
                self.units.pin(self.slots[node], reason)


class _Tracer(fx.Tracer):
    """fx's default tracer: ``torch.nn`` modules are leaves, the user's own modules are traced through."""


def _last_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def _inputs(example_input) -> tuple:
    if isinstance(example_input, torch.Tensor):
        return (example_input,)
    if isinstance(example_input, (tuple, list)) and example_input and all(
        isinstance(t, torch.Tensor) for t in example_input
    ):
        return tuple(example_input)
    raise TypeError(
        f"example_input must be a tensor (or a tuple of tensors) shaped like one batch of model input, "
        f"e.g. torch.randn(1, 1, 28, 28); got {type(example_input).__name__}"
    )


def analyse(work: nn.Module, example_input) -> Analysis:
    """Trace ``work`` (a copy the caller owns: shape propagation runs it once in eval mode) and tie its units.

    The training flags of ``work``'s modules are restored afterwards.
    """
    if not isinstance(work, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(work).__name__}")
    inputs = _inputs(example_input)
    try:
        graph = _Tracer().trace(work)
    except Exception as err:  # fx raises TraceError, TypeError, NotImplementedError, ... from user code
        raise SurgeryError(
            f"cannot trace {type(work).__name__} with torch.fx: {type(err).__name__}: {_last_line(err)}; "
            f"surgery needs a forward pass without data-dependent Python control flow (move such code into "
            f"a torch.nn module, or build the model from standard layers)"
        ) from err
    gm = fx.GraphModule(work, graph)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(inputs):
        raise SurgeryError(
            f"{type(work).__name__}.forward takes {len(placeholders)} input(s) but example_input gave "
            f"{len(inputs)}; pass one example tensor per forward argument"
        )
    flags = {name: m.training for name, m in work.named_modules()}
    work.eval()
    try:
        with torch.no_grad():
            try:
                work(*inputs)  # the user's own error for a wrong input, before fx wraps it
            except Exception as err:
                shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
                raise SurgeryError(
                    f"example_input of shape {shapes} does not run through {type(work).__name__}: "
                    f"{type(err).__name__}: {_last_line(err)}; pass a batch shaped like the model's real input"
                ) from err
            try:
                ShapeProp(gm).propagate(*inputs)
            except Exception as err:
                raise SurgeryError(
                    f"cannot propagate shapes through the traced {type(work).__name__}: {type(err).__name__}: "
                    f"{_last_line(err)}"
                ) from err
    finally:
        for name, m in work.named_modules():
            m.training = flags.get(name, m.training)
    walker = _Walker(gm)
    walker.run()
    analysis = Analysis(work, gm, walker.producers, walker.calls, walker.units, walker.output_shapes)
    for ids, reason in walker.units.pins:
        for root in set(walker.units.roots(ids).tolist()):
            analysis.pinned.setdefault(root, reason)
    return analysis


def layer_error(analysis: Analysis, name) -> SurgeryError:
    """The error for a ``keep`` key that is not a prunable Conv2d/Linear layer of the analysed model."""
    model = analysis.model
    prunable = list(analysis.producers)
    if len(prunable) > 24:
        prunable = prunable[:12] + ["..."] + prunable[-4:]
    if not isinstance(name, str):
        return SurgeryError(f"keep keys must be layer names (str), got {name!r}; choose from {prunable}")
    modules = dict(model.named_modules())
    if name not in modules:
        close = difflib.get_close_matches(name, list(analysis.producers), n=3)
        hint = f"did you mean {close}? " if close else ""
        return SurgeryError(f"no layer {name!r} in {type(model).__name__}; {hint}layers with units: {prunable}")
    kind = type(modules[name]).__name__
    if type(modules[name]) not in (nn.Conv2d, nn.Linear):
        return SurgeryError(
            f"layer {name!r} is a {kind}; keep names nn.Conv2d layers (output channels) or nn.Linear layers "
            f"(output features): {prunable}"
        )
    return SurgeryError(
        f"layer {name!r} ({kind}) is not called on a [N, C, H, W] / [N, features] tensor in the traced "
        f"forward pass, so its units cannot be pruned; layers with units: {prunable}"
    )


def dependency_groups(model: nn.Module, example_input) -> list[ChannelGroup]:
    """The groups of ``Conv2d``/``Linear`` layers of ``model`` whose output units are tied, in forward order.

    Members of a residual add (e.g. a ResNet stage's convs and its projection shortcut), a depthwise conv
    and the layer feeding it, or operands of an element-wise op share one group: their units can only be
    removed together (unit ``i`` of each). A layer with nothing tied to it is a group of its own.
    ``example_input`` is one input batch (e.g. ``torch.randn(1, 1, 28, 28)``); the model is not modified.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    analysis = analyse(copy.deepcopy(model), example_input)
    return groups_of(analysis)


def groups_of(analysis: Analysis) -> list[ChannelGroup]:
    """The :class:`ChannelGroup` list of an :class:`Analysis`."""
    units = analysis.units
    owner: dict[int, str] = {}
    parent = {name: name for name in analysis.producers}

    def find(name: str) -> str:
        while parent[name] != name:
            name = parent[name]
        return name

    roots_of: dict[str, set[int]] = {}
    for name, p in analysis.producers.items():
        roots_of[name] = set(units.roots(p.ids).tolist())
        for r in roots_of[name]:
            if r in owner:
                a, b = find(owner[r]), find(name)
                if a != b:
                    parent[b] = a
            else:
                owner[r] = name
    members: dict[str, list[str]] = {}
    for name in analysis.producers:  # insertion order = forward order
        members.setdefault(find(name), []).append(name)
    groups = []
    for names in members.values():
        roots = set().union(*(roots_of[n] for n in names))
        free = [r for r in roots if r not in analysis.pinned]
        reasons = sorted({analysis.pinned[r] for r in roots if r in analysis.pinned})
        # the leader: a member whose units are the group's units one-to-one (forward order otherwise)
        leaders = [n for n in names if analysis.producers[n].units == len(roots) == len(roots_of[n])]
        if leaders:
            names = [leaders[0]] + [n for n in names if n != leaders[0]]
        elif free:
            free = []
            reasons.append(
                "their units are tied across a concatenation and no single layer spans the group; "
                "name the layers individually in keep"
            )
        groups.append(ChannelGroup(tuple(names), len(roots), bool(free), "; ".join(reasons)))
    return groups
