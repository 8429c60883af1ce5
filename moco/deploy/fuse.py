"""An early-exit network's segment graphs fused into one ONNX graph that exits inside ONNX Runtime.

Why: each segment graph is its own ONNX Runtime session with its own intra-op thread pool, and a pool
spin-waits after its run (onnxruntime's default). Run back to back, the next segment competes with the
spinning threads of the one before: measured 2026-12-02 (AVX-512 EPYC, 2 threads, batch 256, the
compose-fashion exits network), the three segments took 26.9, 27.2 and 16.2 ms back to back against
9.5, 9.1 and 9.9 ms each after a pause, so the exits ran 2x slower than the compressed model without
them. One graph is one session and one pool.

The fused graph has inputs ``input`` (the batch) and ``thresholds`` (float32 ``[K - 1]``, one per
early exit; a disabled exit gets +inf or -inf so that no sample leaves there) and outputs ``logits``
``[B, C]`` and ``exit_index`` (int64 ``[B]``). After each early exit's score, the samples that stay
are gathered (``NonZero`` + ``Gather``), so a later segment runs on the smaller batch exactly as the
multi-graph runtime does; logits and exit indices are scattered back (``ScatterND``) to their rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["fuse_exits"]


def _opset(model) -> int:
    return max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def fuse_exits(paths: Sequence[Path], out: Path, *, higher_is_confident: bool, num_classes: int) -> Path:
    """Write the one-graph form of the segment graphs ``paths`` (in order) to ``out``; returns ``out``.

    Segment ``i < K - 1`` has outputs ``hidden`` (and ``logits``, ``score`` when its exit is enabled),
    the last one ``logits``; each has one input. The graphs are brought to the highest opset among them.
    """
    import onnx
    from onnx import TensorProto, compose, helper, numpy_helper, version_converter

    models = [onnx.load(str(p)) for p in paths]
    opset = max(max(_opset(m) for m in models), 13)
    models = [m if _opset(m) == opset else version_converter.convert_version(m, opset) for m in models]
    nodes, inits = [], []

    def const(name: str, value) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    shape = node("Shape", ["input"], "fuse/shape")
    batch = node("Gather", [shape, const("fuse/zero", np.array(0, dtype=np.int64))], "fuse/batch", axis=0)
    rows = node("Range", [const("fuse/start", np.array(0, dtype=np.int64)), batch,
                          const("fuse/step", np.array(1, dtype=np.int64))], "fuse/rows0")
    rows_shape = node("Shape", [rows], "fuse/rows_shape")
    out_shape = node("Concat", [rows_shape, const("fuse/classes", np.array([num_classes], dtype=np.int64))],
                     "fuse/out_shape", axis=0)
    logits = node("ConstantOfShape", [out_shape], "fuse/logits_init",
                  value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
    exit_index = node("ConstantOfShape", [rows_shape], "fuse/exit_init",
                      value=helper.make_tensor("zero", TensorProto.INT64, [1], [0]))
    current = node("Identity", ["input"], "s0/input")
    compare = "GreaterOrEqual" if higher_is_confident else "LessOrEqual"
    unsq = const("fuse/axis1", np.array([1], dtype=np.int64))
    last = len(models) - 1
    for i, model in enumerate(models):
        prefixed = compose.add_prefix(model, f"s{i}/")
        g = prefixed.graph
        if g.input[0].name != current:
            node("Identity", [current], g.input[0].name)
        nodes.extend(g.node)
        inits.extend(g.initializer)
        names = [o.name for o in g.output]
        if len(names) == 1 and i < last:  # an exit exported disabled: every sample goes on
            current = names[0]
            continue
        seg_logits = names[-1] if i == last else names[1]
        idx = node("Unsqueeze", [rows, unsq], f"fuse/idx{i}")
        logits = node("ScatterND", [logits, idx, seg_logits], f"fuse/logits{i}")
        fill = node("Expand", [const(f"fuse/exit{i}", np.array(i, dtype=np.int64)), node("Shape", [rows], f"fuse/n{i}")],
                    f"fuse/exit_fill{i}")
        exit_index = node("ScatterND", [exit_index, idx, fill], f"fuse/exit_index{i}")
        if i == last:
            break
        threshold = node("Gather", ["thresholds", const(f"fuse/t{i}", np.array(i, dtype=np.int64))], f"fuse/thr{i}",
                         axis=0)
        leaves = node(compare, [names[2], threshold], f"fuse/leaves{i}")
        stays = node("Not", [leaves], f"fuse/stays{i}")
        nz = node("NonZero", [stays], f"fuse/nz{i}")
        local = node("Squeeze", [nz, const(f"fuse/axis0_{i}", np.array([0], dtype=np.int64))], f"fuse/local{i}")
        rows = node("Gather", [rows, local], f"fuse/rows{i + 1}", axis=0)
        current = node("Gather", [names[0], local], f"fuse/hidden{i}", axis=0)
    nodes.append(helper.make_node("Identity", [logits], ["logits"], name="fuse/out_logits"))
    nodes.append(helper.make_node("Identity", [exit_index], ["exit_index"], name="fuse/out_exit"))
    first = models[0].graph.input[0]
    graph = helper.make_graph(
        nodes, "moco_exits_fused",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *[d.dim_value for d in
                                                                              first.type.tensor_type.shape.dim[1:]]]),
         helper.make_tensor_value_info("thresholds", TensorProto.FLOAT, [max(last, 1)])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_classes]),
         helper.make_tensor_value_info("exit_index", TensorProto.INT64, ["batch"])],
        initializer=inits)
    domains = {}
    for m in models:
        for o in m.opset_import:
            key = "" if o.domain == "ai.onnx" else o.domain
            domains[key] = max(domains.get(key, 0), o.version)
    domains[""] = opset
    fused = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in domains.items()],
                              producer_name="moco")
    fused.ir_version = max(m.ir_version for m in models)
    onnx.checker.check_model(fused)
    onnx.save(fused, str(out))
    return out
