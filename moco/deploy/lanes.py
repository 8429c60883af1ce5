"""Batch lanes: a model's leading few-channel convolutions rewritten to vectorise over the batch's images.

Why. A pruned CNN keeps few channels on large maps (seed 003's fashion_cnn pruned to 3 and 5 channels on
26x26 and 24x24). ONNX Runtime runs such convolutions badly either way: its NCHWc kernels block the
channels by the vector width (16 floats on AVX-512), so a 5-channel convolution pays for 16 channels
and two reorders of the padded maps; its plain NCHW kernels unfold every image and run a GEMM with 3
to 5 rows, bound by the unfolding. Measured by :func:`moco.deploy.op_profile` (2026-12-03, AVX-512
EPYC, 2 threads, 1,000 images): the two convolutions and their reorders take 86% of the small
model's kernel time.

What. The vector lanes go over the *images* instead of the channels: a batch of ``B`` images with
``C`` channels is held as ``C`` tensors ``[1, B, H, W]`` (one per channel, the images in the channel
slot), and a convolution becomes, for every (output, input) channel pair, a depthwise convolution
(``groups=B``) whose ``B`` filters are that pair's kernel repeated; the pairs of an output channel
are summed. The NCHWc depthwise kernels then run with every lane busy, whatever the channel count.
Elementwise activations, BatchNorm (folded into the convolution before it) and max/average pooling
act on each channel tensor; a ``Flatten`` + ``Linear`` after the convolutions becomes one matrix
product per channel tensor, summed (no transpose back); anything else gets the ``[B, C, H, W]``
tensor back (concatenate, transpose) and runs unchanged. Same arithmetic, reassociated sums: outputs
equal the original's to float rounding (the exporter checks every lane graph against the plain one).

The rewritten module works on batches of exactly ``batch`` images (the repeated filters fix it):
:func:`moco.deploy.export` writes it as a second, fixed-batch graph beside the dynamic one, times it
with the other session settings and keeps it only where it is faster; the runtime runs the full
chunks of ``batch`` images through it and the rest through the dynamic graph.

:func:`lane_model` finds the leading chain by tracing the model with ``torch.fx``; a model that does
not trace, or does not start with a convolution of at most ``max_pairs`` channel pairs, gets None
(nothing to gain, the export goes on without lanes). The model itself is never modified.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["MAX_PAIRS", "LaneStack", "lane_model"]

MAX_PAIRS = 64
"""Most (output, input) channel pairs of one convolution rewritten (one depthwise convolution each):
the rewrite pays per pair, so it only suits the few-channel convolutions it is for (8 x 8 at most)."""

_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
                        nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Identity,
                        nn.Dropout, nn.Dropout2d)
_ELEMENTWISE_FUNCTIONS = {torch.relu, F.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, torch.sigmoid,
                          F.sigmoid, torch.tanh, F.tanh, F.hardswish, F.hardsigmoid, F.hardtanh, F.mish,
                          F.softplus, F.dropout}
_ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh"}
_POOL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d}


class _Conv(nn.Module):
    """One convolution over channel tensors ``[1, B, H, W]``: per output channel, the sum over its input
    channels of a depthwise convolution with that pair's kernel repeated ``B`` times (bias in the first)."""

    def __init__(self, conv: nn.Conv2d, batch: int, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.batch, self.stride, self.padding, self.dilation = batch, conv.stride, conv.padding, conv.dilation
        per_group_out = conv.out_channels // conv.groups
        per_group_in = conv.in_channels // conv.groups
        self.pairs: list[list[tuple[int, str]]] = []  # per output channel: (input channel, buffer name)
        for o in range(conv.out_channels):
            first = (o // per_group_out) * per_group_in
            row = []
            for j in range(per_group_in):
                kernel = weight[o, j]
                if not torch.any(kernel) and row:  # a pruned-away connection costs nothing
                    continue
                name = f"w{o}_{first + j}"
                self.register_buffer(name, kernel.expand(batch, 1, *kernel.shape).contiguous())
                row.append((first + j, name))
            self.pairs.append(row)
            if bias is not None:
                self.register_buffer(f"b{o}", bias[o].expand(batch).contiguous())
        self.has_bias = bias is not None

    def forward(self, lanes: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for o, row in enumerate(self.pairs):
            acc = None
            for k, (c, name) in enumerate(row):
                b = getattr(self, f"b{o}") if self.has_bias and k == 0 else None
                y = F.conv2d(lanes[c], getattr(self, name), b, self.stride, self.padding, self.dilation, self.batch)
                acc = y if acc is None else acc + y
            out.append(acc)
        return out


class _Each(nn.Module):
    """A per-channel operation (activation, pooling, affine) applied to every channel tensor."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fn = fn  # an nn.Module (registered) or a traced function with its constant arguments bound

    def forward(self, lanes: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.fn(t) for t in lanes]


class _Affine(nn.Module):
    """An eval-mode BatchNorm2d not right after a convolution: ``x * scale_c + shift_c`` per channel tensor."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        scale, shift = _bn_affine(bn)
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    def forward(self, lanes: list[torch.Tensor]) -> list[torch.Tensor]:
        return [t * self.scale[c] + self.shift[c] for c, t in enumerate(lanes)]


class _FlattenLinear(nn.Module):
    """``Flatten`` + ``Linear`` on the channel tensors: ``b + sum_c lane_c.reshape(B, H*W) @ W_c``."""

    def __init__(self, linear: nn.Linear, channels: int, batch: int):
        super().__init__()
        hw = linear.in_features // channels
        w = linear.weight.detach()
        for c in range(channels):
            self.register_buffer(f"w{c}", w[:, c * hw:(c + 1) * hw].t().contiguous())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.channels, self.batch, self.hw = channels, batch, hw

    def forward(self, lanes: list[torch.Tensor]) -> torch.Tensor:
        out = None
        for c, t in enumerate(lanes):
            y = torch.matmul(t.reshape(self.batch, self.hw), getattr(self, f"w{c}"))
            out = y if out is None else out + y
        return out if self.bias is None else out + self.bias


class LaneStack(nn.Module):
    """The rewritten chain: ``[B, C, H, W]`` in, the chain's last output out (see the module docstring)."""

    def __init__(self, steps: list[nn.Module], batch: int, channels: int, flat: bool):
        super().__init__()
        self.steps = nn.ModuleList(steps)
        self.batch, self.channels, self.flat = batch, channels, flat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != self.batch:
            raise ValueError(f"this lane graph takes batches of exactly {self.batch} images, got {x.shape[0]}")
        if self.channels == 1:
            lanes = [x.reshape(1, self.batch, x.shape[2], x.shape[3])]
        else:
            lanes = [x[:, c].unsqueeze(0) for c in range(self.channels)]
        for step in self.steps:
            lanes = step(lanes)
        if self.flat:
            return lanes
        return torch.cat(lanes, 0).transpose(0, 1)


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    mean, var = bn.running_mean.detach(), bn.running_var.detach()
    weight = bn.weight.detach() if bn.weight is not None else torch.ones_like(mean)
    bias = bn.bias.detach() if bn.bias is not None else torch.zeros_like(mean)
    scale = weight / torch.sqrt(var + bn.eps)
    return scale, bias - mean * scale


def _only_tensor_arg(node: fx.Node, prev: fx.Node) -> bool:
    """``prev`` is the node's first argument and no other argument is a graph value."""
    args = list(node.args) + list(node.kwargs.values())
    if not args or args[0] is not prev:
        return False
    return not any(isinstance(a, fx.Node) for a in args[1:])


def _flatten_start(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A flatten from dim 1 to the end, in its module, function or method spelling."""
    if node.op == "call_module":
        m = modules[node.target]
        return isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    spelled = (node.op == "call_function" and node.target is torch.flatten) or \
              (node.op == "call_method" and node.target == "flatten")
    return spelled and start == 1 and end == -1


def _step(node: fx.Node, prev: fx.Node, modules: dict[str, nn.Module], max_pairs: int) -> Any:
    """What the chain does with ``node`` (an ``nn`` module or the tag ``"flatten"``), or None to stop."""
    if not _only_tensor_arg(node, prev):
        return None
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, nn.Conv2d):
            ok = (m.padding_mode == "zeros" and not isinstance(m.padding, str)
                  and m.out_channels * m.in_channels // m.groups <= max_pairs)
            return m if ok else None
        if isinstance(m, nn.BatchNorm2d):
            return m if m.track_running_stats and m.running_mean is not None else None
        if isinstance(m, _ELEMENTWISE_MODULES):
            return m
        if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            return m if not getattr(m, "return_indices", False) else None
        if isinstance(m, nn.Flatten):
            return "flatten" if _flatten_start(node, modules) else None
        return None
    if node.op == "call_function" and (node.target in _ELEMENTWISE_FUNCTIONS or node.target in _POOL_FUNCTIONS):
        return None if node.kwargs.get("return_indices") else node
    if node.op == "call_method" and node.target in _ELEMENTWISE_METHODS:
        return node
    if _flatten_start(node, modules):
        return "flatten"
    return None


def _apply(node: fx.Node) -> Callable[[torch.Tensor], torch.Tensor]:
    """The per-tensor callable of a traced function/method node (its constant arguments bound)."""
    rest = node.args[1:]
    kwargs = {k: v for k, v in node.kwargs.items() if k != "inplace"}  # the first lanes view the caller's input
    if node.op == "call_method":
        return lambda t: getattr(t, node.target)(*rest, **kwargs)
    return lambda t: node.target(t, *rest, **kwargs)


def lane_model(model: nn.Module, batch: int, example: torch.Tensor, *, max_pairs: int = MAX_PAIRS) -> nn.Module | None:
    """``model`` with its leading few-channel convolutions in batch lanes, for batches of exactly ``batch``.

    ``example``: one input batch ``[N, C, H, W]`` (the shape is what matters). Returns a new module (the
    model is deep-copied in eval mode, never changed) whose outputs equal the model's to float rounding,
    or None when the model does not trace with ``torch.fx``, takes no 4-d input, or does not start with a
    convolution of at most ``max_pairs`` (output, input) channel pairs.
    """
    if example.dim() != 4:
        return None
    net = copy.deepcopy(model).eval()
    try:
        gm = fx.symbolic_trace(net)
    except Exception:  # noqa: BLE001 - a model fx cannot trace simply gets no lanes
        return None
    modules = dict(gm.named_modules())
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return None
    steps: list[nn.Module] = []
    chain: list[fx.Node] = []
    channels = int(example.shape[1])
    convs, flat, prev = 0, False, inputs[0]
    source: nn.Conv2d | None = None  # the convolution of the last step, while that step is one (BN folds into it)
    while len(prev.users) == 1:
        node = next(iter(prev.users))
        what = _step(node, prev, modules, max_pairs)
        if what is None:
            break
        if isinstance(what, nn.Conv2d):
            if what.in_channels != channels:
                break
            steps.append(_Conv(what, batch, what.weight.detach(), None if what.bias is None else what.bias.detach()))
            channels, convs, source = what.out_channels, convs + 1, what
        elif isinstance(what, nn.BatchNorm2d):
            if what.num_features != channels:
                break
            if source is not None:  # fold into the convolution just before
                scale, shift = _bn_affine(what)
                weight = source.weight.detach() * scale.view(-1, 1, 1, 1)
                bias = (source.bias.detach() if source.bias is not None else torch.zeros_like(scale)) * scale + shift
                steps[-1] = _Conv(source, batch, weight, bias)
            else:
                steps.append(_Affine(what))
        elif isinstance(what, nn.Module):
            if getattr(what, "inplace", False):  # the first lanes are views of the caller's input
                what.inplace = False
            steps.append(_Each(what))
        elif what == "flatten":
            user = next(iter(node.users)) if len(node.users) == 1 else None
            lin = modules.get(user.target) if user is not None and user.op == "call_module" else None
            if convs and isinstance(lin, nn.Linear) and _only_tensor_arg(user, node) and lin.in_features % channels == 0:
                steps.append(_FlattenLinear(lin, channels, batch))
                chain += [node, user]
                prev, flat = user, True
            break
        else:
            steps.append(_Each(_apply(what)))
        if not isinstance(what, nn.Conv2d):
            source = None
        chain.append(node)
        prev = node
    if not convs:
        return None
    stack = LaneStack(steps, batch, int(example.shape[1]), flat)
    gm.add_submodule("moco_lanes", stack)
    with gm.graph.inserting_after(inputs[0]):
        new = gm.graph.call_module("moco_lanes", (inputs[0],))
    prev.replace_all_uses_with(new)
    for node in reversed(chain):
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm.eval()

