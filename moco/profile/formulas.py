"""Closed-form FLOP formulas from the seed documents."""

from __future__ import annotations

from moco.errors import MocoError

__all__ = ["seed003_flops"]


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise MocoError(f"{name} must be a positive int, got {value!r}")
    return value


def seed003_flops(
    c1_kernel: int,
    c2_kernel: int,
    c1_channels: int,
    c2_channels: int,
    hidden: int,
    *,
    input_size: int = 28,
    in_channels: int = 1,
    num_classes: int = 10,
) -> dict[str, int]:
    """Seed 003's FLOP count of ``fashion_cnn`` (``Params1``), per layer and in total, at batch size 1.

    The seed counts one FLOP per multiply-accumulate, plus one per bias addition and one per ReLU
    output, with square kernels R=S and no padding (H = W = ``input_size``, C = ``in_channels``)::

        conv1 = (C*R1*S1 + 2) * (H-R1+1) * (W-S1+1) * M1
        conv2 = (M1*R2*S2 + 2) * (H-R1-R2+2) * (W-S1-S2+2) * M2
        fc1   = (H-R1-R2+2) * (W-S1-S2+2) * M2 * F1 + F1 + F1
        fc2   = F1 * F2 + F2

    with M1, M2 = ``c1_channels``, ``c2_channels``, F1 = ``hidden``, F2 = ``num_classes``. In
    :mod:`moco.profile` terms the total equals ``macs + bias_flops + activation_flops`` summed over the
    model (:meth:`moco.profile.Profile.seed003_total`). For ``(3, 3, 16, 16, 100)``: conv1 118,976,
    conv2 1,345,536, fc1 921,800, fc2 1,010.

    Returns ``{"conv1", "conv2", "fc1", "fc2", "total"}`` in FLOPs (ints); ``MocoError`` for arguments
    that are not positive ints or kernels that leave no pixels.
    """
    r1 = _positive_int("c1_kernel", c1_kernel)
    r2 = _positive_int("c2_kernel", c2_kernel)
    m1 = _positive_int("c1_channels", c1_channels)
    m2 = _positive_int("c2_channels", c2_channels)
    f1 = _positive_int("hidden", hidden)
    size = _positive_int("input_size", input_size)
    c = _positive_int("in_channels", in_channels)
    f2 = _positive_int("num_classes", num_classes)
    h = w = size
    side1 = h - r1 + 1
    side2 = h - r1 - r2 + 2
    if side2 < 1:
        raise MocoError(f"kernels {r1} and {r2} leave no pixels of a {size}x{size} input")
    conv1 = (c * r1 * r1 + 2) * side1 * (w - r1 + 1) * m1
    conv2 = (m1 * r2 * r2 + 2) * side2 * (w - r1 - r2 + 2) * m2
    fc1 = side2 * (w - r1 - r2 + 2) * m2 * f1 + f1 + f1
    fc2 = f1 * f2 + f2
    return {"conv1": conv1, "conv2": conv2, "fc1": fc1, "fc2": fc2, "total": conv1 + conv2 + fc1 + fc2}
