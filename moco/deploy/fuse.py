"""Multi-graph results fused into one ONNX graph that makes the exit decisions inside ONNX Runtime:
an early-exit network's segments (:func:`fuse_exits`) and a branched network's head and tail
(:func:`fuse_branched`).

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
multi-graph runtime does; logits and exit indices are scattered back (``ScatterND``) to their rows. A
later part that ONNX Runtime cannot run on an empty batch is put behind an ``If`` (see
:func:`_maybe_guarded`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["fuse_branched", "fuse_exits"]


def _opset(model) -> int:
    return max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


class _Builder:
    """The node and initializer lists of the fused graph, and helpers that append to them."""

    def __init__(self):
        self.nodes: list = []
        self.inits: list = []

    def const(self, name: str, value) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output


def _input_info(model):
    """The fused graph's ``input``: float32, dynamic batch, the per-sample shape of ``model``'s input."""
    from onnx import TensorProto, helper

    dims = model.graph.input[0].type.tensor_type.shape.dim[1:]
    return helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *[d.dim_value for d in dims]])


def _load(paths: Sequence[Path]) -> tuple[list, int]:
    """The graphs at ``paths``, brought to the highest default-domain opset among them (at least 13)."""
    import onnx
    from onnx import version_converter

    models = [onnx.load(str(p)) for p in paths]
    opset = max(max(_opset(m) for m in models), 13)
    return [m if _opset(m) == opset else version_converter.convert_version(m, opset) for m in models], opset


def _runs_empty(model) -> bool:
    """Whether ONNX Runtime runs ``model`` on an empty batch (most kernels do; ``Reshape(0, -1)`` does not)."""
    import onnxruntime as ort

    dims = model.graph.input[0].type.tensor_type.shape.dim[1:]
    if any(not d.HasField("dim_value") for d in dims):
        return False
    options = ort.SessionOptions()
    options.log_severity_level = 4  # a failure is the answer here, not an error to print (it looked like one)
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        run_options = ort.RunOptions()
        run_options.log_severity_level = 4
        session.run(None, {session.get_inputs()[0].name: np.zeros([0, *[d.dim_value for d in dims]], np.float32)},
                    run_options)
    except Exception:  # noqa: BLE001 - onnxruntime raises its own types; any failure means "guard it"
        return False
    return True


def _maybe_guarded(model, graph, rows: str, tag: str) -> tuple[list, dict[str, str]]:
    """``graph``'s nodes as they are when ``model`` runs on an empty batch, else behind :func:`_guarded`.

    An ``If`` costs: its subgraph misses the layout optimisations (NCHWc) of the main graph and builds
    an execution frame per run (measured on exits-fashion, batch 256: the fused graph with every later
    segment behind an ``If`` took 77 ms against 52 ms for the separate sessions)."""
    if _runs_empty(model):
        return list(graph.node), {o.name: o.name for o in graph.output}
    return _guarded(graph, rows, tag)


def _guarded(graph, rows: str, tag: str) -> tuple[list, dict[str, str]]:
    """Nodes that run ``graph``'s nodes only when the gathered batch ``rows`` (int64 ``[n]``) is not
    empty (an ONNX ``If``); else its outputs are empty tensors of the same per-sample shape. Kernels
    such as ``Reshape(0, -1)`` cannot run on an empty batch, which the multi-graph runtime never
    passes them. Returns ``(nodes, {output name: guarded output name})``; MocoError when an output's
    per-sample shape is not static (nothing to build the empty tensor from)."""
    from onnx import helper, numpy_helper

    from moco.errors import MocoError

    outputs = list(graph.output)
    then_out, else_nodes, else_out, renamed = [], [], [], {}
    then_nodes = list(graph.node)
    for o in outputs:
        dims = o.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims[1:]):
            raise MocoError(f"output {o.name} has no static per-sample shape")
        elem = o.type.tensor_type.elem_type
        then_nodes.append(helper.make_node("Identity", [o.name], [o.name + "@then"], name=o.name + "@then"))
        then_out.append(helper.make_tensor_value_info(o.name + "@then", elem, None))
        empty = np.zeros([0, *[d.dim_value for d in dims[1:]]], dtype=helper.tensor_dtype_to_np_dtype(elem))
        else_nodes.append(helper.make_node("Constant", [], [o.name + "@else"], name=o.name + "@else",
                                           value=numpy_helper.from_array(empty)))
        else_out.append(helper.make_tensor_value_info(o.name + "@else", elem, None))
        renamed[o.name] = o.name + "@g"
    n = helper.make_node("Size", [rows], [f"fuse/{tag}/n"], name=f"fuse/{tag}/n")
    zero = helper.make_node("Constant", [], [f"fuse/{tag}/zero"], name=f"fuse/{tag}/zero",
                            value=numpy_helper.from_array(np.array(0, dtype=np.int64)))
    cond = helper.make_node("Greater", [f"fuse/{tag}/n", f"fuse/{tag}/zero"], [f"fuse/{tag}/any"],
                            name=f"fuse/{tag}/any")
    node = helper.make_node("If", [f"fuse/{tag}/any"], list(renamed.values()), name=f"fuse/{tag}/if",
                            then_branch=helper.make_graph(then_nodes, f"{tag}_then", [], then_out),
                            else_branch=helper.make_graph(else_nodes, f"{tag}_else", [], else_out))
    return [n, zero, cond, node], renamed


def fuse_exits(paths: Sequence[Path], out: Path, *, higher_is_confident: bool, num_classes: int) -> Path:
    """Write the one-graph form of the segment graphs ``paths`` (in order) to ``out``; returns ``out``.

    Segment ``i < K - 1`` has outputs ``hidden`` (and ``logits``, ``score`` when its exit is enabled),
    the last one ``logits``; each has one input. The graphs are brought to the highest opset among them.
    """
    from onnx import TensorProto, compose, helper

    models, opset = _load(paths)
    b = _Builder()
    nodes, inits, const, node = b.nodes, b.inits, b.const, b.node
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
        inits.extend(g.initializer)
        names = [o.name for o in g.output]
        if i == 0:
            nodes.extend(g.node)
        else:  # a later segment runs on the samples still active: maybe none
            guard, renamed = _maybe_guarded(model, g, rows, f"s{i}")
            nodes.extend(guard)
            names = [renamed[name] for name in names]
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
    graph = helper.make_graph(
        nodes, "moco_exits_fused",
        [_input_info(models[0]),
         helper.make_tensor_value_info("thresholds", TensorProto.FLOAT, [max(last, 1)])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_classes]),
         helper.make_tensor_value_info("exit_index", TensorProto.INT64, ["batch"])],
        initializer=inits)
    return _save(models, graph, opset, out)


def fuse_branched(head: Path, tail: Path, out: Path, *, output: str, num_classes: int) -> Path:
    """Write the one-graph form of a branched network (``head``: ``x -> hidden, mask, classes``;
    ``tail``: ``hidden -> logits``) to ``out``: outputs ``predictions`` (int64 classes for
    ``output="classes"``, else float32 ``[B, C]``: one-hot where the rule decided, the tail's logits
    elsewhere) and ``mask`` (bool ``[B]``, True where the rule decided). The tail runs on the
    undecided samples only. Returns ``out``."""
    from onnx import TensorProto, compose, helper

    models, opset = _load((head, tail))
    h, t = (compose.add_prefix(m, f"{k}/").graph for m, k in zip(models, ("h", "t")))
    b = _Builder()
    nodes, inits, const, node = b.nodes, b.inits, b.const, b.node
    nodes.extend([helper.make_node("Identity", ["input"], [h.input[0].name], name="fuse/input"), *h.node])
    inits.extend([*h.initializer, *t.initializer])

    hidden, mask, classes = (o.name for o in h.output)
    mask_b = node("Cast", [mask], "fuse/mask", to=TensorProto.BOOL)
    cls = node("Cast", [classes], "fuse/classes", to=TensorProto.INT64)
    keep = node("Squeeze", [node("NonZero", [node("Not", [mask_b], "fuse/stays")], "fuse/nz"),
                            const("fuse/axis0", np.array([0], dtype=np.int64))], "fuse/keep")
    node("Gather", [hidden, keep], t.input[0].name, axis=0)
    guard, renamed = _maybe_guarded(models[1], t, keep, "tail")  # the tail runs on the undecided: maybe none
    nodes.extend(guard)
    idx = node("Unsqueeze", [keep, const("fuse/axis1", np.array([1], dtype=np.int64))], "fuse/idx")
    rest = renamed[t.output[0].name]
    if output == "classes":
        pred = node("ScatterND", [cls, idx, node("ArgMax", [rest], "fuse/argmax", axis=1, keepdims=0)], "fuse/pred")
        pred_info = helper.make_tensor_value_info("predictions", TensorProto.INT64, ["batch"])
    else:
        onehot = node("OneHot", [cls, const("fuse/depth", np.array(num_classes, dtype=np.int64)),
                                 const("fuse/onoff", np.array([0.0, 1.0], dtype=np.float32))], "fuse/onehot", axis=-1)
        pred = node("ScatterND", [onehot, idx, rest], "fuse/pred")
        pred_info = helper.make_tensor_value_info("predictions", TensorProto.FLOAT, ["batch", num_classes])
    nodes.append(helper.make_node("Identity", [pred], ["predictions"], name="fuse/out_pred"))
    nodes.append(helper.make_node("Identity", [mask_b], ["mask"], name="fuse/out_mask"))
    graph = helper.make_graph(
        nodes, "moco_branched_fused", [_input_info(models[0])],
        [pred_info, helper.make_tensor_value_info("mask", TensorProto.BOOL, ["batch"])], initializer=inits)
    return _save(models, graph, opset, out)


def _save(models, graph, opset: int, out: Path) -> Path:
    import onnx
    from onnx import helper

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
