"""Counting formulas for aten operators and the dispatch mode that applies them.

Every aten op that runs under :class:`CountingMode` falls in exactly one of three groups:

* it has a formula in :data:`FORMULAS` and its work is added to the module that is executing;
* it is in :data:`ZERO_COST_OPS` (views, metadata, copies, concatenation, padding, indexing,
  allocation and fill): it moves or allocates memory but does no arithmetic, so it costs 0;
* neither: if it can be decomposed into other aten ops (``OpOverload.decompose``, as
  ``torch.utils.flop_counter.FlopCounterMode`` does) its pieces are counted, otherwise it is recorded
  as *unsupported* with a call count whenever it touched a non-empty tensor, never silently as 0.

Units (all integers, per call, for the whole batch the op ran on):

* ``macs``: multiply-accumulates of mm, addmm, bmm, baddbmm, mv, addmv, dot and convolutions
  (``Cin/groups * prod(kernel) * Cout * prod(out_spatial) * N``; transposed convolutions use the
  input's spatial size instead of the output's).
* ``bias_flops``: the additive term of convolution (when it has a bias) and of addmm / baddbmm /
  addmv: 1 FLOP per output element.
* ``activation_flops``: relu, gelu, sigmoid, tanh, hardtanh, silu, ... : 1 FLOP per output element.
* ``other_elementwise_flops``: everything else element-wise or reduction-like, see
  :data:`ELEMENTWISE_RULES`.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["CountingMode", "ELEMENTWISE_RULES", "FORMULAS", "Work", "ZERO_COST_OPS", "count_op", "op_name"]

aten = torch.ops.aten


@dataclass
class Work:
    """Mutable accumulator of counted work (integers; see the module docstring for units)."""

    macs: int = 0
    bias_flops: int = 0
    activation_flops: int = 0
    other_elementwise_flops: int = 0

    def add(self, other: "Work") -> None:
        """Add ``other`` into this accumulator in place."""
        self.macs += other.macs
        self.bias_flops += other.bias_flops
        self.activation_flops += other.activation_flops
        self.other_elementwise_flops += other.other_elementwise_flops

    def is_zero(self) -> bool:
        """True when no work of any kind was counted."""
        return not (self.macs or self.bias_flops or self.activation_flops or self.other_elementwise_flops)

    def as_tuple(self) -> tuple[int, int, int, int]:
        """``(macs, bias_flops, activation_flops, other_elementwise_flops)``."""
        return (self.macs, self.bias_flops, self.activation_flops, self.other_elementwise_flops)


Formula = Callable[[tuple, dict, Any], Work]


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _out_numel(out: Any) -> int:
    """Elements of the op's first tensor output (0 when it returns no tensor)."""
    tensors = _tensors(out)
    return tensors[0].numel() if tensors else 0


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


# ---------------------------------------------------------------- multiply-accumulate ops


def _mm(args, kwargs, out) -> Work:
    a, b = args[0], args[1]
    return Work(macs=a.shape[0] * a.shape[1] * b.shape[1])


def _addmm(args, kwargs, out) -> Work:
    a, b = args[1], args[2]
    return Work(macs=a.shape[0] * a.shape[1] * b.shape[1], bias_flops=_out_numel(out))


def _bmm(args, kwargs, out) -> Work:
    a, b = args[0], args[1]
    return Work(macs=a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2])


def _baddbmm(args, kwargs, out) -> Work:
    a, b = args[1], args[2]
    return Work(macs=a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2], bias_flops=_out_numel(out))


def _mv(args, kwargs, out) -> Work:
    return Work(macs=args[0].numel())


def _addmv(args, kwargs, out) -> Work:
    return Work(macs=args[1].numel(), bias_flops=_out_numel(out))


def _dot(args, kwargs, out) -> Work:
    return Work(macs=args[0].numel())


def _conv_formula(bias_index: int | None, transposed_index: int | None) -> Formula:
    """Formula for a convolution op whose bias / ``transposed`` flag sit at the given positions."""

    def formula(args, kwargs, out) -> Work:
        x, w = args[0], args[1]
        transposed = transposed_index is not None and len(args) > transposed_index and bool(args[transposed_index])
        bias = args[bias_index] if bias_index is not None and len(args) > bias_index else None
        out_numel = _out_numel(out)
        per_position = math.prod(w.shape[1:])  # Cin/groups * prod(kernel), or Cout/groups * prod(kernel) if transposed
        if transposed:
            # every input element is scattered through a Cout/groups x kernel window
            macs = x.numel() * per_position
        else:
            # every output element gathers a Cin/groups x kernel window
            macs = out_numel * per_position
        return Work(macs=macs, bias_flops=out_numel if isinstance(bias, torch.Tensor) else 0)

    return formula


# ---------------------------------------------------------------- fused kernels (attention, recurrent layers)
#
# Fused kernels do in one aten call what the reference (unfused) path does in many. Their work is
# counted by running that reference path on shape-only ``meta`` tensors under a nested CountingMode,
# so a fused call counts exactly what the unfused path counts (no data is touched, nothing is
# computed). Attention is counted dense: all Lq x Lk scores, causal or masked, as the math kernel
# computes them (a flash kernel may skip fully masked blocks, up to half the QK^T and AV work when
# causal); a mask costs one add per score.


def _meta(value: Any) -> Any:
    return torch.empty(value.shape, dtype=value.dtype, device="meta") if isinstance(value, torch.Tensor) else value


def _count_reference(reference: Callable[..., Any], *args: Any, **kwargs: Any) -> Work:
    """Work of ``reference(*args, **kwargs)`` run on meta copies of its tensor arguments."""
    args = tuple(_meta(a) for a in args)
    kwargs = {k: _meta(v) for k, v in kwargs.items()}
    inner = CountingMode(lambda: "")
    with inner:
        reference(*args, **kwargs)
    return inner.total


def _sdpa_math(q, k, v, mask=None, is_causal=False, scale=None):
    """The math kernel of scaled dot-product attention (composite: mul, bmm, softmax, bmm)."""
    if mask is not None:
        mask = torch.empty(q.shape[:-1] + (k.shape[-2],), dtype=q.dtype, device="meta")
    return aten._scaled_dot_product_attention_math(q, k, v, mask, 0.0, bool(is_causal) and mask is None, scale=scale)


def _sdpa_formula(mask_index: int | None, causal_index: int) -> Formula:
    """Formula for a fused SDPA kernel whose mask / ``is_causal`` sit at these positions (or in kwargs)."""

    def formula(args, kwargs, out) -> Work:
        mask = _arg(args, kwargs, mask_index, "attn_bias", None) if mask_index is not None else None
        mask = mask if mask is not None else kwargs.get("attn_mask")
        return _count_reference(_sdpa_math, args[0], args[1], args[2], mask=mask,
                                is_causal=bool(_arg(args, kwargs, causal_index, "is_causal", False)),
                                scale=kwargs.get("scale"))

    return formula


def _heads(x, batch: int, length: int, heads: int):
    return x.reshape(batch, length, heads, -1).transpose(1, 2)


def _mha_reference(query, key, value, embed_dim, num_head, qkv_weight, qkv_bias, proj_weight, proj_bias,
                   mask=None, need_weights=True, average_attn_weights=True, mask_type=None):
    """``nn.MultiheadAttention``'s unfused path: three input projections, attention, output projection."""
    import torch.nn.functional as F

    batch, lq, lk = query.shape[0], query.shape[1], key.shape[1]
    wq, wk, wv = qkv_weight.split(embed_dim)
    bq, bk, bv = qkv_bias.split(embed_dim)
    q = _heads(F.linear(query, wq, bq), batch, lq, num_head)
    k = _heads(F.linear(key, wk, bk), batch, lk, num_head)
    v = _heads(F.linear(value, wv, bv), batch, lk, num_head)
    out, weights = _sdpa_math(q, k, v, mask=mask)
    if need_weights and average_attn_weights:
        weights.mean(dim=1)
    return F.linear(out.transpose(1, 2).reshape(batch, lq, embed_dim), proj_weight, proj_bias)


def _encoder_layer_reference(src, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias, use_gelu,
                             norm_first, eps, norm_weight_1, norm_bias_1, norm_weight_2, norm_bias_2, ffn_weight_1,
                             ffn_bias_1, ffn_weight_2, ffn_bias_2, mask=None, mask_type=None):
    """``nn.TransformerEncoderLayer``'s unfused path: self-attention, feed-forward, two layer norms, two adds."""
    import torch.nn.functional as F

    def attention(x):
        return _mha_reference(x, x, x, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias,
                              mask=mask, need_weights=False)

    def feed_forward(x):
        hidden = F.linear(x, ffn_weight_1, ffn_bias_1)
        return F.linear(F.gelu(hidden) if use_gelu else F.relu(hidden), ffn_weight_2, ffn_bias_2)

    def norm(x, weight, bias):
        return F.layer_norm(x, (embed_dim,), weight, bias, eps)

    if norm_first:
        x = src + attention(norm(src, norm_weight_1, norm_bias_1))
        return x + feed_forward(norm(x, norm_weight_2, norm_bias_2))
    x = norm(src + attention(src), norm_weight_1, norm_bias_1)
    return norm(x + feed_forward(x), norm_weight_2, norm_bias_2)


def _reference_formula(reference: Callable[..., Any]) -> Formula:
    """Formula counting ``reference`` on the op's arguments; a nested-tensor input counts per sequence."""

    def formula(args, kwargs, out) -> Work:
        first = args[0]
        if isinstance(first, torch.Tensor) and first.is_nested:
            work = Work()
            for sequence in first.unbind():
                work.add(_count_reference(reference, sequence.unsqueeze(0), *args[1:], **kwargs))
            return work
        return _count_reference(reference, *args, **kwargs)

    return formula


def _mkldnn_rnn_layer(args, kwargs, out) -> Work:
    """One direction of one LSTM layer (oneDNN): per step the gate products and the cell update.

    Counted as the unfused path does: ``T*B*4H*(I+H)`` MACs (input and recurrent products of the 4
    gates), the two gate biases (``2*T*B*4H`` bias FLOPs), 3 sigmoids and 2 tanh per hidden unit and
    step (activations), and per hidden unit and step 4 gate adds, ``f*c + i*g`` (3) and ``o*tanh(c)`` (1).
    Only the LSTM mode is used by PyTorch on CPU; other modes return ``None`` (listed as unsupported).
    """
    x, w_ih, w_hh = args[0], args[1], args[2]
    mode = int(_arg(args, kwargs, 9, "mode"))
    if mode != 2:
        return None  # type: ignore[return-value]
    hidden = w_hh.shape[1]
    gates = w_ih.shape[0]
    steps_times_batch = x.shape[0] * x.shape[1]
    has_biases = bool(_arg(args, kwargs, 12, "has_biases", True))
    return Work(
        macs=steps_times_batch * gates * (w_ih.shape[1] + hidden),
        bias_flops=2 * steps_times_batch * gates if has_biases else 0,
        activation_flops=5 * steps_times_batch * hidden,
        other_elementwise_flops=steps_times_batch * (gates + 4 * hidden),
    )


# ---------------------------------------------------------------- element-wise and reductions


def _per_output(kind: str, factor: int = 1) -> Formula:
    def formula(args, kwargs, out) -> Work:
        return Work(**{kind: factor * _out_numel(out)})

    return formula


def _per_input(factor: int = 1) -> Formula:
    def formula(args, kwargs, out) -> Work:
        tensors = _tensors(args)
        return Work(other_elementwise_flops=factor * (tensors[0].numel() if tensors else 0))

    return formula


def _batch_norm(args, kwargs, out) -> Work:
    """2 FLOPs per element with running statistics (scale, shift); 4 when it computes batch statistics."""
    if len(args) > 0 and isinstance(args[0], torch.Tensor):
        numel = args[0].numel()
    else:
        numel = _out_numel(out)
    training = next((a for a in args[3:] if isinstance(a, bool)), kwargs.get("training", False))
    return Work(other_elementwise_flops=(4 if training else 2) * numel)


def _window_pool(spatial_dims: int) -> Formula:
    """Pooling with a kernel: one FLOP (compare or add) per window element read, per output element."""

    def formula(args, kwargs, out) -> Work:
        kernel = _arg(args, kwargs, 1, "kernel_size")
        kernel = [int(k) for k in kernel] if isinstance(kernel, (list, tuple)) else [int(kernel)]
        if len(kernel) == 1:
            kernel = kernel * spatial_dims
        return Work(other_elementwise_flops=_out_numel(out) * math.prod(kernel))

    return formula


# Element-wise rules, by op name: (column, FLOPs per element, counted on "output" or "input").
ELEMENTWISE_RULES: dict[str, tuple[str, int, str]] = {}
"""Op name -> (column, FLOPs per element, whether elements are those of the ``output`` or ``input``)."""

_ACTIVATIONS = (
    "relu", "gelu", "sigmoid", "tanh", "hardtanh", "silu", "leaky_relu", "elu", "celu", "selu",
    "hardswish", "hardsigmoid", "softplus", "mish", "threshold", "_prelu_kernel", "log_sigmoid_forward",
    "glu", "rrelu_with_noise", "relu6",
)
_ONE_PER_OUTPUT = (
    "add", "sub", "rsub", "mul", "div", "neg", "reciprocal", "sqrt", "rsqrt", "exp", "exp2", "log", "log2",
    "log10", "log1p", "expm1", "pow", "abs", "sign", "sgn", "sin", "cos", "tan", "erf", "erfc", "erfinv",
    "maximum", "minimum", "fmax", "fmin", "where", "clamp", "clamp_min", "clamp_max", "eq", "ne", "lt",
    "le", "gt", "ge", "logical_and", "logical_or", "logical_not", "logical_xor", "floor", "ceil", "round",
    "trunc", "frac", "fmod", "remainder", "square", "masked_fill", "hypot", "atan2", "nan_to_num",
    "bitwise_and", "bitwise_or", "bitwise_xor", "bitwise_not", "floor_divide",
)
_TWO_PER_OUTPUT = ("addcmul", "addcdiv", "lerp")
_SOFTMAX = ("_softmax", "_log_softmax", "_safe_softmax")  # max, subtract, exp, sum, divide: 5 per element
_ONE_PER_INPUT = ("sum", "mean", "amax", "amin", "max", "min", "argmax", "argmin", "prod", "any", "all", "nansum")
_TWO_PER_INPUT = ("var", "std", "var_mean", "std_mean", "linalg_vector_norm", "norm")  # square (or subtract) + add
_STATISTICS_NORMS = ("native_layer_norm", "native_group_norm")  # mean, variance, normalise, affine: 4 per element
_ADAPTIVE_POOLS = ("_adaptive_avg_pool2d", "_adaptive_avg_pool3d", "adaptive_max_pool2d", "adaptive_max_pool3d",
                   "adaptive_avg_pool1d", "adaptive_max_pool1d")
_WINDOW_POOLS = {
    "max_pool1d": 1, "avg_pool1d": 1, "max_pool2d": 2, "max_pool2d_with_indices": 2, "avg_pool2d": 2,
    "max_pool3d": 3, "max_pool3d_with_indices": 3, "avg_pool3d": 3,
}

for _n in _ACTIVATIONS:
    ELEMENTWISE_RULES[_n] = ("activation_flops", 1, "output")
for _n in _ONE_PER_OUTPUT:
    ELEMENTWISE_RULES[_n] = ("other_elementwise_flops", 1, "output")
for _n in _TWO_PER_OUTPUT:
    ELEMENTWISE_RULES[_n] = ("other_elementwise_flops", 2, "output")
for _n in _SOFTMAX:
    ELEMENTWISE_RULES[_n] = ("other_elementwise_flops", 5, "output")
for _n in _ONE_PER_INPUT + _ADAPTIVE_POOLS:
    ELEMENTWISE_RULES[_n] = ("other_elementwise_flops", 1, "input")
for _n in _TWO_PER_INPUT:
    ELEMENTWISE_RULES[_n] = ("other_elementwise_flops", 2, "input")
for _n in _STATISTICS_NORMS:
    ELEMENTWISE_RULES[_n] = ("other_elementwise_flops", 4, "input")

ZERO_COST_OPS: frozenset[str] = frozenset({
    # views and metadata
    "view", "_unsafe_view", "reshape", "_reshape_alias", "view_as", "flatten", "unflatten", "t", "t_",
    "transpose", "transpose_", "permute", "expand", "expand_as", "squeeze", "squeeze_", "unsqueeze",
    "unsqueeze_", "detach", "detach_", "alias", "as_strided", "as_strided_", "slice", "select", "narrow",
    "split", "split_with_sizes", "chunk", "unbind", "unsafe_split", "unsafe_split_with_sizes", "unsafe_chunk", "unfold", "diagonal", "view_as_real", "view_as_complex",
    "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "size", "stride", "numel", "dim",
    "is_contiguous", "is_strides_like_format", "is_non_overlapping_and_dense", "storage_offset", "layout",
    "device", "_local_scalar_dense", "resize_", "set_", "lift_fresh",
    # copies and data movement (memory traffic, no arithmetic)
    "clone", "_to_copy", "to", "copy", "copy_", "contiguous", "lift_fresh_copy", "cat", "stack",
    "constant_pad_nd", "index_select", "gather", "index", "repeat", "roll", "flip", "slice_copy",
    "select_copy", "view_copy", "permute_copy", "expand_copy", "t_copy", "transpose_copy", "unsqueeze_copy",
    "squeeze_copy", "split_copy", "split_with_sizes_copy", "alias_copy", "detach_copy", "_unsafe_view_copy",
    # allocation and fill
    "empty", "empty_like", "empty_strided", "zeros", "zeros_like", "ones", "ones_like", "full", "full_like",
    "new_empty", "new_empty_strided", "new_zeros", "new_ones", "new_full", "fill", "fill_", "zero", "zero_",
    "scalar_tensor", "arange", "tril", "triu",
})
"""Names of aten ops that do no arithmetic: views, metadata, copies, concatenation, padding, indexing,
allocation and fill. They cost 0 MACs and 0 FLOPs and are never reported as unsupported."""


def _resolve(name: str) -> list[Any]:
    """The overload packets named ``name`` (and its in-place ``name_`` variant) that exist in aten."""
    packets = []
    for candidate in (name, name + "_"):
        packet = getattr(aten, candidate, None)
        if packet is not None:
            packets.append(packet)
    return packets


def _build_formulas() -> dict[Any, Formula]:
    table: dict[Any, Formula] = {}

    def put(name: str, formula: Formula) -> None:
        for packet in _resolve(name):
            table.setdefault(packet, formula)

    for name, formula in (("mm", _mm), ("addmm", _addmm), ("bmm", _bmm), ("baddbmm", _baddbmm), ("mv", _mv),
                          ("addmv", _addmv), ("dot", _dot), ("vdot", _dot)):
        put(name, formula)
    for name in ("convolution", "_convolution", "convolution_overrideable"):
        put(name, _conv_formula(bias_index=2, transposed_index=6))
    put("mkldnn_convolution", _conv_formula(bias_index=2, transposed_index=None))
    put("_slow_conv2d_forward", _conv_formula(bias_index=3, transposed_index=None))
    put("cudnn_convolution", _conv_formula(bias_index=None, transposed_index=None))
    put("_scaled_dot_product_flash_attention_for_cpu", _sdpa_formula(mask_index=None, causal_index=4))
    put("_scaled_dot_product_flash_attention", _sdpa_formula(mask_index=None, causal_index=4))
    put("_scaled_dot_product_efficient_attention", _sdpa_formula(mask_index=3, causal_index=6))
    put("_scaled_dot_product_cudnn_attention", _sdpa_formula(mask_index=3, causal_index=6))
    put("_scaled_dot_product_fused_attention_overrideable", _sdpa_formula(mask_index=3, causal_index=5))
    put("_native_multi_head_attention", _reference_formula(_mha_reference))
    put("_transformer_encoder_layer_fwd", _reference_formula(_encoder_layer_reference))
    put("mkldnn_rnn_layer", _mkldnn_rnn_layer)
    for name in ("native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training"):
        put(name, _batch_norm)
    for name, dims in _WINDOW_POOLS.items():
        put(name, _window_pool(dims))
    for name, (column, factor, where) in ELEMENTWISE_RULES.items():
        put(name, _per_output(column, factor) if where == "output" else _per_input(factor))
    return table


FORMULAS: dict[Any, Formula] = _build_formulas()
"""aten overload packet -> formula ``(args, kwargs, output) -> Work``."""

_ZERO_COST_PACKETS: frozenset[Any] = frozenset(
    [p for name in ZERO_COST_OPS for p in _resolve(name)]
    + [getattr(torch.ops.prim, n) for n in ("layout", "device") if hasattr(torch.ops.prim, n)]
)


def op_name(func: Any) -> str:
    """Display name of an aten overload, by packet: ``aten.cumsum``."""
    return str(getattr(func, "_overloadpacket", func))


def count_op(func: Any, args: tuple, kwargs: dict, out: Any) -> Work | None:
    """Work of one executed op; ``Work()`` for zero-cost ops, ``None`` when there is no formula."""
    packet = getattr(func, "_overloadpacket", None)
    if packet in _ZERO_COST_PACKETS:
        return Work()
    formula = FORMULAS.get(packet)
    if formula is None:
        return None
    return formula(args, kwargs or {}, out)


def _touches_data(args: tuple, kwargs: dict, out: Any) -> bool:
    return any(t.numel() > 0 for t in _tensors((args, kwargs, out)))


class CountingMode(TorchDispatchMode):
    """Counts the work of every aten op and attributes it to ``current()``, the executing module's name.

    After the run: ``by_module[name]`` is a :class:`Work`, ``total`` the same work summed without
    attribution (a whole-model count to check the attribution against), ``unsupported[name]`` a
    ``Counter`` of op name -> calls for ops without a formula, and ``unsupported_total`` their sum.
    """

    def __init__(self, current: Callable[[], str]):
        super().__init__()
        self._current = current
        self.by_module: dict[str, Work] = defaultdict(Work)
        self.total = Work()
        self.unsupported: dict[str, Counter] = defaultdict(Counter)
        self.unsupported_total: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = getattr(func, "_overloadpacket", None)
        if packet not in FORMULAS and packet not in _ZERO_COST_PACKETS:
            # Same policy as FlopCounterMode: count the pieces of a decomposable op.
            with self:
                result = func.decompose(*args, **kwargs)
            if result is not NotImplemented:
                return result
        out = func(*args, **kwargs)
        work = count_op(func, args, kwargs, out)
        name = self._current()
        if work is None:
            if _touches_data(args, kwargs, out):
                self.unsupported[name][op_name(func)] += 1
                self.unsupported_total[op_name(func)] += 1
        elif not work.is_zero():
            self.by_module[name].add(work)
            self.total.add(work)
        return out
