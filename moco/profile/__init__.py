"""Per-module profile of a model: parameters, MACs, FLOPs, activation bytes and latency.

``profile(model, example_input)`` returns a :class:`Profile` with one :class:`LayerProfile` row per
module (qualified names as in ``model.named_modules()``), totals, the bottleneck (most MACs), the
slowest module and the ops it could not count.

Conventions
-----------
* Counts are for the whole batch of ``example_input``; ``Profile.per_sample`` divides by the batch
  size N. Every count is a module's *own* work (its children's is in their rows), summed over calls.
* **MACs** are multiply-accumulates of convolutions (including grouped/depthwise:
  ``Cin/groups * kH * kW * Cout * Hout * Wout * N``; transposed: with the input's spatial size),
  linear / matmul (mm, addmm, bmm, baddbmm, mv, addmv, dot).
* **FLOPs** ``flops = 2 * macs + elementwise_flops`` where ``elementwise_flops`` is the sum of

  - ``bias_flops``: the bias term of a convolution or addmm/baddbmm/addmv, 1 per output element;
  - ``activation_flops``: relu, gelu, sigmoid, tanh, hardtanh, silu, leaky_relu, elu, hardswish,
    hardsigmoid, softplus, mish, ...: 1 per output element;
  - ``other_elementwise_flops``: add/sub/mul/div and other element-wise math 1 per output element
    (addcmul/addcdiv/lerp 2); batch norm with running statistics (eval) 2 per element (scale and
    shift), normalisation computing statistics (training batch norm, layer norm, group norm) 4;
    max/avg pooling one compare/add per window element read (kernel size per output element),
    adaptive pooling 1 per input element; softmax/log_softmax 5 per element (max, subtract, exp,
    sum, divide); sum/mean/max/min/argmax/... 1 per input element; var/std/norm 2 per input element.

* Fused kernels count as their unfused reference paths (run on shape-only meta tensors, so the
  counts are identical): ``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention`` fast paths (QKV
  and output projections, ``QK^T`` and ``AV``, softmax, feed-forward, layer norms),
  ``F.scaled_dot_product_attention`` kernels and oneDNN LSTM layers (``T*B*4H*(I+H)`` MACs: input and
  recurrent products of the 4 gates per time step). Attention is counted **dense**: every one of the
  ``Lq x Lk`` scores, also when causal or masked, as the math kernel computes them; a mask adds one
  FLOP per score.
* A TorchScript model runs without Python module hooks: totals are exact, rows are not attributed
  (``Profile.attribution`` says so, ``bottleneck`` is ``None``).
* Views, metadata, copies, concatenation, padding, indexing and allocation are zero-cost
  (``moco.profile.counting.ZERO_COST_OPS``). Any other aten op that touches tensor data and has no
  formula is listed in ``Profile.unsupported_ops`` with its call count, never silently counted as 0.
* Seed 003 counts ``macs + bias_flops + activation_flops`` (``Profile.seed003_total()``), which
  equals :func:`seed003_flops` for ``fashion_cnn`` at batch size 1.
* ``2 * macs`` equals ``torch.utils.flop_counter.FlopCounterMode``'s total, which counts only
  matmul-family ops and convolutions as 2 FLOPs per MAC; it does not count mv, addmv or dot, which
  moco does.
* ``params`` are a module's own parameters (a shared parameter counts once), so the column sums to
  the model's total. ``activation_bytes`` are the bytes of a module's output tensors, summed over calls.
* ``latency_s`` is a module's median exclusive wall-clock time (seconds, children excluded) over
  ``repeats`` forward passes (default 3, after the counting pass and ``warmup`` passes, default 1);
  ``latency_share`` its fraction of the sum over rows. Without latency the model runs exactly once.
  ``Profile.forward_time_s`` is the median whole forward pass without hooks.
* The model runs in eval mode under ``torch.no_grad()``; nothing on it is changed (hooks are global
  and removed afterwards, ``training`` flags are restored). Global hooks see every module in the
  process, so do not run other models in other threads while profiling.
"""

from moco.profile.formulas import seed003_flops
from moco.profile.hardware import cpu_flags, cpu_name, nchwc_block_size
from moco.profile.profiler import profile
from moco.profile.report import LayerProfile, Profile

__all__ = ["profile", "Profile", "LayerProfile", "cpu_flags", "cpu_name", "nchwc_block_size", "seed003_flops"]
