"""What the processor is and which channel widths its inference kernels like.

ONNX Runtime's fast CPU convolutions (MLAS's NCHWc layout) work on blocks of channels: 8 floats on
AVX2, 16 on AVX-512. A layer whose width is not a multiple of the block falls back to slower kernels:
measured 2026-12-02 on an AVX-512 EPYC, 1 thread, batch 256, random weights, vgg_bn at 0.55 of its
widths ran in 93.5 ms with odd widths (19, 35, 71) and 39.4 ms rounded to multiples of 16 (the original:
140.4 ms); MobileNet v1 / 0.25 at 0.55 ran 3x *slower* than the original with odd widths (101.7 vs
33.3 ms) and 1.8x faster rounded to 16 (18.6 ms). Compression that chooses widths (PFA, pruning) uses
:func:`nchwc_block_size` through ``round_to="auto"``.
"""

from __future__ import annotations

import platform

__all__ = ["cpu_flags", "cpu_name", "nchwc_block_size"]


def _cpuinfo_lines() -> list[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            return fh.readlines()
    except OSError:
        return []


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo on Linux), else ``platform.processor()``."""
    for text in _cpuinfo_lines():
        if text.lower().startswith("model name"):
            return text.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown cpu"


def cpu_flags() -> frozenset[str]:
    """The instruction-set flags /proc/cpuinfo lists (``avx2``, ``avx512f``, ...); empty where unknown."""
    for text in _cpuinfo_lines():
        key = text.split(":", 1)[0].strip().lower()
        if key in ("flags", "features"):
            return frozenset(text.split(":", 1)[1].split())
    return frozenset()


def nchwc_block_size(flags: frozenset[str] | None = None) -> int:
    """Channels per block of ONNX Runtime's NCHWc convolution kernels on this CPU (or on ``flags``).

    16 with AVX-512F, 8 otherwise: 8 is AVX2's block, and on a CPU without NCHWc kernels a multiple
    of 8 costs at most a few channels (vector units everywhere prefer it). Widths that are multiples
    of this run on the fast kernels.
    """
    flags = cpu_flags() if flags is None else flags
    return 16 if "avx512f" in flags else 8
