"""moco.deploy: export + load for plain models, BranchedNetwork and EarlyExitNetwork, FP32 and int8."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moco.deploy import BranchedRuntime, ExitsRuntime, ExportResult, ModelRuntime, export, load
from moco.errors import MocoError
from moco.exits import attach_exits
from moco.models import create
from moco.rules.branched import BranchedNetwork
from moco.rules.rule import RuleSet

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def x():
    return torch.randn(96, 1, 28, 28, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def y():
    return torch.randint(0, 10, (96,), generator=torch.Generator().manual_seed(4))


def _rules(n_features: int, quantile_of, seed=0) -> RuleSet:
    """A 10-class margin RuleSet with random weights whose threshold lets about half the samples exit."""
    g = np.random.default_rng(seed)
    w = g.normal(0, 0.05, (n_features, 10)).astype(np.float32)
    rs = RuleSet(w, np.zeros(10, np.float32), tuple(range(10)), {c: 0.0 for c in range(10)}, layer=2)
    t = _between(rs.scores(quantile_of).max(dim=1).values, 0.5)
    return RuleSet(w, np.zeros(10, np.float32), tuple(range(10)), {c: t for c in range(10)}, layer=2)


@pytest.fixture(scope="module")
def exits_net(x):
    torch.manual_seed(0)
    model = create("resnet18", in_channels=1, width_multiplier=0.25).eval()
    net = attach_exits(model, ["layer1", "layer2"], example_input=x[:1]).eval()
    with torch.no_grad():
        for head in net.heads:  # spread the untrained heads' scores (else all entropies sit near ln 10)
            [m for m in head.modules() if isinstance(m, torch.nn.Linear)][-1].weight.mul_(30)
        s = [net.criterion.score(z) for z in net.forward_all(x)[:-1]]
    net.thresholds = [_between(s[0], 0.4), _between(s[1], 0.6)]
    return net


def _between(scores: torch.Tensor, q: float) -> float:
    """A threshold halfway between two neighbouring scores (no score lies on it): about a fraction q below."""
    v = scores.detach().sort().values
    k = int(q * len(v))
    return float((v[k] + v[k + 1]) / 2)


def test_plain_model_file_and_folder(seed_cnn, x, y, tmp_path):
    res = export(seed_cnn, tmp_path / "m.onnx", x[:4], check=(x, y))
    assert isinstance(res, ExportResult) and res.kind == "model" and res.precision == "fp32"
    assert res.fp32.agreement == 1.0 and res.fp32.n_samples == 100 and res.fp32.max_abs_diff < 1e-4
    assert res.fp32.accuracy == res.fp32.reference_accuracy and res.int8 is None
    d = res.to_dict()
    json.dumps(d)
    assert d["size_bytes"]["fp32"] > 1e6 and "fp32 vs torch" in str(res)
    rt = load(tmp_path / "m.onnx", intra_op_num_threads=1)
    assert isinstance(rt, ModelRuntime) and rt.intra_op_num_threads == 1
    with torch.no_grad():
        ref = seed_cnn(x).numpy()
    out = rt(x)  # torch in, numpy out; dynamic batch
    assert isinstance(out, np.ndarray) and out.shape == (96, 10)
    assert (out.argmax(1) == ref.argmax(1)).all() and np.abs(out - ref).max() < 1e-4
    assert rt(x[:1].numpy()).shape == (1, 10)
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(meta["moco.session"])["optimization"] in ("all", "extended")  # the tuned session settings
    folder = export(seed_cnn, tmp_path / "mf", x[:4])
    item = json.loads((tmp_path / "mf" / "manifest.json").read_text())["graphs"]["fp32"][0]
    assert item["session"]["name"] in ("all", "all-no-nchwc", "extended") and set(item["session"]["measured_s"]) == {
        "all", "all-no-nchwc", "extended"}
    assert load(tmp_path / "mf").graphs[0].config["disabled_optimizers"] == item["session"]["disabled_optimizers"]
    assert (tmp_path / "mf" / "manifest.json").is_file() and folder.graphs["fp32"] == {"model.onnx": folder.graphs["fp32"]["model.onnx"]}
    assert np.abs(load(tmp_path / "mf")(x) - ref).max() < 1e-4


def test_micro_batches_give_the_same_outputs_and_are_checked(exits_net, seed_cnn, x, tmp_path):
    """A tuned micro-batch runs a large batch in chunks with the same outputs; a malformed one is refused."""
    export(seed_cnn, tmp_path / "m", x[:4])
    path = tmp_path / "m" / "manifest.json"
    doc = json.loads(path.read_text())
    session = doc["graphs"]["fp32"][0]["session"]
    assert session["micro_batch"] in (None, 256, 64) and session["batch"] in (512, 64)
    whole = load(tmp_path / "m", optimization="all")
    assert whole.graphs[0].micro_batch is None
    doc["graphs"]["fp32"][0]["session"] = dict(session, name="all", optimization="all", disabled_optimizers=[],
                                               micro_batch=7)
    path.write_text(json.dumps(doc))
    chunked = load(tmp_path / "m")
    assert chunked.graphs[0].micro_batch == 7 and chunked.graphs[0].config["micro_batch"] == 7
    np.testing.assert_allclose(chunked(x), whole(x), rtol=1e-5, atol=1e-5)  # 96 samples = 13 chunks of <= 7
    assert chunked(x[:3]).shape == (3, 10)
    for bad in (0, -4, 2.5, True, "256"):
        doc["graphs"]["fp32"][0]["session"]["micro_batch"] = bad
        path.write_text(json.dumps(doc))
        with pytest.raises(MocoError, match="session settings"):
            load(tmp_path / "m")
    doc["graphs"]["fp32"][0]["session"]["micro_batch"] = None
    doc["graphs"]["fp32"][0]["session"]["optimization"] = "turbo"   # the message named neither file nor graph
    path.write_text(json.dumps(doc))
    with pytest.raises(MocoError, match=r"manifest.json is malformed: graph 'model.onnx' has session settings"):
        load(tmp_path / "m")
    # exits: every segment graph chunks the same way and the decisions do not change
    export(exits_net, tmp_path / "e", x[:8])
    path = tmp_path / "e" / "manifest.json"
    doc = json.loads(path.read_text())
    ref_logits, ref_exit = load(tmp_path / "e", optimization="all")(x)
    for item in doc["graphs"]["fp32"]:
        item["session"] = dict(item["session"], name="all", optimization="all", disabled_optimizers=[], micro_batch=5)
    path.write_text(json.dumps(doc))
    logits, exit_at = load(tmp_path / "e")(x)
    assert (exit_at == ref_exit).all()
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)


def test_plain_model_int8_reports_agreement(seed_cnn, x, y, tmp_path):
    res = export(seed_cnn, tmp_path / "q", x[:4], int8=x[:64], check=(x, y))
    assert res.precision == "int8" and set(res.graphs) == {"fp32", "int8"}
    assert res.size_bytes["int8"] < 0.5 * res.size_bytes["fp32"]  # int8 weights
    assert 0.0 <= res.int8.agreement <= 1.0 and res.int8.accuracy is not None
    assert res.int8_vs_fp32.reference == "fp32" and res.int8_vs_fp32.n_samples == 100
    rt8, rt32 = load(tmp_path / "q"), load(tmp_path / "q", precision="fp32")
    assert rt8.precision == "int8" and rt32.precision == "fp32"
    got = (rt8(x).argmax(1) == rt32(x).argmax(1)).mean()
    assert got == pytest.approx(res.int8_vs_fp32.agreement, abs=0.05)
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert manifest["verification"]["int8"]["agreement"] == res.int8.agreement


@pytest.mark.parametrize("pooling", [None, "max"])
def test_branched_runtime_equals_pytorch(seed_cnn, x, tmp_path, pooling):
    with torch.no_grad():
        hidden = seed_cnn[:2](x)
    feats = hidden.amax(dim=(2, 3)) if pooling else hidden.flatten(1)
    net = BranchedNetwork(seed_cnn, 2, _rules(feats.shape[1], feats), pooling=pooling)
    with torch.no_grad():
        pred, mask = net(x)
    assert 0 < int(mask.sum()) < len(x)  # both paths run
    res = export(net, tmp_path / "b", x[:8], check=x, int8=x[:64])
    assert res.kind == "branched" and res.fp32.agreement == 1.0 and res.fp32.decisions == 1.0
    rt = load(tmp_path / "b", precision="fp32")
    assert isinstance(rt, BranchedRuntime)
    p2, m2 = rt(x)
    assert (m2 == mask.numpy()).all() and (p2.argmax(1) == pred.argmax(1).numpy()).all()
    assert np.abs(p2 - pred.numpy()).max() < 1e-4
    assert 0.0 <= res.int8.decisions <= 1.0  # reported
    classes_net = BranchedNetwork(seed_cnn, 2, net.rule, pooling=pooling, output="classes")
    export(classes_net, tmp_path / "c", x[:8])
    c, m3 = load(tmp_path / "c")(x)
    assert c.dtype == np.int64 and (c == pred.argmax(1).numpy()).all() and (m3 == mask.numpy()).all()
    # the fused graph (head, rule and tail in one session) and the two graphs give the same results
    for folder in ("b", "c"):
        fused = load(tmp_path / folder, precision="fp32")
        assert fused.fused is not None and fused.manifest["fused"]["fp32"]["file"] == "branched.onnx"
        separate = load(tmp_path / folder, precision="fp32")
        separate.fused = None
        (pa, ma), (pb, mb) = fused(x), separate(x)
        assert pa.dtype == pb.dtype and (ma == mb).all() and np.abs(pa - pb).max() < 1e-5
        assert fused(x[:1])[0].shape[0] == 1 and fused(x[:0])[0].shape[0] == 0


def test_exits_runtime_equals_pytorch_and_int8_recheck(exits_net, x, y, tmp_path):
    with torch.no_grad():
        logits, idx = exits_net(x)
    assert len(set(idx.tolist())) == 3  # every exit taken
    res = export(exits_net, tmp_path / "e", x[:8], check=(x, y), int8=(x, y))
    assert res.kind == "exits" and res.fp32.agreement == 1.0 and res.fp32.decisions == 1.0
    assert res.recheck["n"] == 96 and 0.0 <= res.recheck["bound"] <= 1.0 and res.recheck["metric"] == "accuracy_drop"
    rt = load(tmp_path / "e", precision="fp32", intra_op_num_threads=1)
    assert isinstance(rt, ExitsRuntime) and rt.thresholds == exits_net.thresholds
    l2, i2 = rt(x)
    assert (i2 == idx.numpy()).all() and np.abs(l2 - logits.numpy()).max() < 1e-4
    assert rt(x[:0])[0].shape == (0, 10)
    rt.thresholds = [None, None]  # everything to the final exit
    assert (rt(x)[1] == 2).all()
    with pytest.raises(MocoError, match="finite"):
        rt.thresholds = [math.nan, None]
    exits_net_disabled = attach_exits(create("resnet18", in_channels=1, width_multiplier=0.25).eval(),
                                      ["layer1", "layer2"], example_input=x[:1], thresholds=[None, 0.5]).eval()
    export(exits_net_disabled, tmp_path / "d", x[:8])
    rt_d = load(tmp_path / "d")
    with pytest.raises(MocoError, match="exported disabled"):
        rt_d.thresholds = [0.1, 0.5]


def test_edited_thresholds_and_malformed_manifests(exits_net, seed_cnn, x, tmp_path):
    export(exits_net, tmp_path / "e", x[:8])
    path = tmp_path / "e" / "manifest.json"
    doc = json.loads(path.read_text())
    for bad in (float("nan"), 1e300):
        edited = dict(doc, thresholds=[bad, doc["thresholds"][1]])
        path.write_text(json.dumps(edited))
        with pytest.raises(MocoError, match="threshold 0"):
            load(tmp_path / "e")
    path.write_text("{not json")
    with pytest.raises(MocoError, match="not valid JSON"):
        load(tmp_path / "e")
    path.write_text(json.dumps({k: v for k, v in doc.items() if k != "kind"}))
    with pytest.raises(MocoError, match="kind"):
        load(tmp_path / "e")
    path.write_text(json.dumps(dict(doc, thresholds=[0.1])))
    with pytest.raises(MocoError, match="segment graphs"):
        load(tmp_path / "e")
    path.write_text(json.dumps(doc))
    (tmp_path / "e" / "segment1.onnx").unlink()
    with pytest.raises(MocoError, match="segment1.onnx.*missing"):
        load(tmp_path / "e")
    export(seed_cnn, tmp_path / "m", x[:4])
    (tmp_path / "m" / "model.onnx").write_bytes(b"garbage")
    with pytest.raises(MocoError, match="sha256"):
        load(tmp_path / "m")
    with pytest.raises(MocoError, match="does not exist"):
        load(tmp_path / "nowhere")
    with pytest.raises(MocoError, match="no 'int8' graphs"):
        export(seed_cnn, tmp_path / "m", x[:4]) and load(tmp_path / "m", precision="int8")


def test_bad_inputs(seed_cnn, x, tmp_path):
    export(seed_cnn, tmp_path / "m", x[:4])
    rt = load(tmp_path / "m")
    with pytest.raises(TypeError, match="dtype"):
        rt(np.zeros((2, 1, 28, 28), dtype=np.int64))
    with pytest.raises(MocoError, match="per-sample shape"):
        rt(np.zeros((2, 1, 20, 28), dtype=np.float32))
    with pytest.raises(MocoError, match="NaN"):
        rt(np.full((2, 1, 28, 28), np.nan, dtype=np.float32))
    with pytest.raises(TypeError, match="numpy array"):
        rt([1, 2, 3])
    with pytest.raises(MocoError, match="intra_op_num_threads"):
        load(tmp_path / "m", intra_op_num_threads=-1)
    with pytest.raises(TypeError, match="export needs"):
        export(object(), tmp_path / "z", x[:4])
    with pytest.raises(MocoError, match="folder path"):
        export(BranchedNetwork(seed_cnn, 2, _rules(32 * 26 * 26, seed_cnn[:2](x[:8]).flatten(1))),
               tmp_path / "b.onnx", x[:4])
    with pytest.raises(MocoError, match=r"could not run on example_input of shape \(2, 3, 28, 28\).*shape the model"):
        export(seed_cnn, tmp_path / "w", torch.rand(2, 3, 28, 28))
    with pytest.raises(MocoError, match=r"check inputs are \(1, 20, 28\) per sample but example_input is \(1, 28, 28\)"):
        export(seed_cnn, tmp_path / "w", x[:2], check=torch.rand(4, 1, 20, 28))
    assert not (tmp_path / "w").exists()


def test_runtime_needs_no_torch(exits_net, seed_cnn, x, tmp_path):
    """The deployed runtime runs in a process where ``import torch`` fails."""
    export(exits_net, tmp_path / "e", x[:8])
    export(seed_cnn, tmp_path / "m.onnx", x[:4])
    with torch.no_grad():
        logits, idx = exits_net(x)
        ref_m = seed_cnn(x)
    np.savez(tmp_path / "data.npz", x=x.numpy(), logits=logits.numpy(), idx=idx.numpy(), m=ref_m.numpy())
    script = f"""
import sys
sys.modules["torch"] = None  # any "import torch" now raises ImportError
import numpy as np
from moco.deploy import load
d = np.load({str(tmp_path / 'data.npz')!r})
logits, idx = load({str(tmp_path / 'e')!r})(d["x"])
assert (idx == d["idx"]).all() and np.abs(logits - d["logits"]).max() < 1e-4
out = load({str(tmp_path / 'm.onnx')!r})(d["x"])
assert np.abs(out - d["m"]).max() < 1e-4
from moco.deploy import op_profile
assert op_profile({str(tmp_path / 'm.onnx')!r}, d["x"], runs=2).rows
assert sys.modules["torch"] is None
print("ok without torch")
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ok without torch" in proc.stdout


def test_op_profile_shows_where_the_time_goes(exits_net, seed_cnn, x, tmp_path):
    """onnxruntime's per-node kernel times of a deployed model, per run, warm-up excluded."""
    from moco.deploy import op_profile

    export(seed_cnn, tmp_path / "m", x[:4], tune=False)
    prof = op_profile(tmp_path / "m", x, runs=3)
    assert prof.runs == 3 and prof.batch == len(x) and prof.rows and prof.kernel_s > 0 and prof.wall_s > 0
    assert abs(sum(r.share for r in prof.rows) - 1) < 1e-9 and prof.rows[0].seconds >= prof.rows[-1].seconds
    assert all(r.calls == 1 for r in prof.rows)  # warm-up runs left out: one call of each node per run
    ops = set(prof.by_op_type())
    assert ops & {"Conv", "FusedConv"} and ops & {"Gemm", "FusedGemm", "MatMul"}, ops
    assert "where the time goes" in prof.to_text() and len(prof.to_frame()) == len(prof.rows)
    assert prof.to_dict()["rows"][0]["node"] == prof.rows[0].node
    # micro-batches: each node runs once per chunk
    doc = json.loads((tmp_path / "m" / "manifest.json").read_text())
    doc["graphs"]["fp32"][0]["session"] = {"optimization": "all", "disabled_optimizers": [], "micro_batch": 32}
    (tmp_path / "m" / "manifest.json").write_text(json.dumps(doc))
    chunked = op_profile(tmp_path / "m", x[:96], runs=2)
    assert {r.calls for r in chunked.rows} == {3}
    export(exits_net, tmp_path / "e", x[:8], tune=False)
    assert {r.graph for r in op_profile(tmp_path / "e", x, runs=2).rows} == {"exits.onnx"}  # the fused graph
    for bad in (0, 1.5, True):
        with pytest.raises(MocoError, match="runs must be an int"):
            op_profile(tmp_path / "m", x, runs=bad)


def test_tuned_export_times_the_fused_graph_itself(exits_net, x, tmp_path):
    """With tune=True the fused exits graph gets session settings of its own, timed end to end for each
    candidate (not copied from the first segment), and the runtime built from them gives the same results."""
    from moco.deploy.runtime import SESSION_CONFIGS

    export(exits_net, tmp_path / "e", x[:8])
    doc = json.loads((tmp_path / "e" / "manifest.json").read_text())
    session = doc["fused"]["fp32"]["session"]
    assert set(session["measured_s"]) == set(SESSION_CONFIGS) and all(v > 0 for v in session["measured_s"].values())
    assert session["name"] in SESSION_CONFIGS and session["optimization"] == SESSION_CONFIGS[session["name"]]["optimization"]
    best = min(session["measured_s"], key=session["measured_s"].get)
    assert session["name"] in ("all", best)  # "all" unless another is at least 5% faster
    if session["name"] != "all":
        assert session["measured_s"][best] < 0.95 * session["measured_s"]["all"]
    fused, segments = load(tmp_path / "e"), load(tmp_path / "e")
    segments.fused = None
    (l1, e1), (l2, e2) = fused(x), segments(x)
    assert (e1 == e2).all()
    np.testing.assert_allclose(l1, l2, rtol=1e-5, atol=1e-5)


def test_fused_exits_graph_equals_the_segments(exits_net, x, tmp_path):
    """The one-graph exits (one session) gives the segments' logits and exits, for edited thresholds too."""
    export(exits_net, tmp_path / "e", x[:8], tune=False)
    doc = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert doc["fused"]["fp32"]["file"] == "exits.onnx" and (tmp_path / "e" / "exits.onnx").is_file()
    fused = load(tmp_path / "e")
    assert fused.fused is not None
    segments = load(tmp_path / "e")
    segments.fused = None
    for thresholds in (fused.thresholds, [None, None], [fused.thresholds[0], None], [1e-6, 1e6], [1e6, 1e-6]):
        fused.thresholds = segments.thresholds = thresholds
        (l1, e1), (l2, e2) = fused(x), segments(x)
        assert (e1 == e2).all()
        np.testing.assert_allclose(l1, l2, rtol=1e-5, atol=1e-5)
    assert fused(x[:1])[0].shape == (1, 10) and fused(x[:0])[0].shape == (0, 10)
    (tmp_path / "e" / "exits.onnx").unlink()
    with pytest.raises(MocoError, match="exits.onnx.*missing"):
        load(tmp_path / "e")


def test_a_batchnorm1d_before_the_rule_exports_with_one_sample(x, tmp_path):
    # the head's wrapper must be exported and then run in eval mode: torch.onnx.export restores the wrapper's
    # mode, and a fresh module is in training mode (a BatchNorm1d then refused a 1-sample batch, and with more
    # samples used batch statistics)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 32), torch.nn.BatchNorm1d(32),
                                torch.nn.ReLU(), torch.nn.Linear(32, 10)).eval()
    with torch.no_grad():
        model[2].running_mean.normal_(0, 0.5)
        feats = model[:3](x)
    net = BranchedNetwork(model, 2, _rules(32, feats))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    res = export(net, tmp_path / "bn", x[:1], check=x, tune=False)
    assert res.fp32.agreement == 1.0 and res.fp32.decisions == 1.0
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items()) and not net.training


def test_the_input_standardisation_travels_with_the_deployed_model(seed_cnn, x, tmp_path):
    # a model trained on (x - mean) / std needs that at deployment too: the manifest (or a single .onnx's
    # metadata) records it and runtime.preprocess applies it to raw images
    mean, std = 0.1307, 0.3081
    export(seed_cnn, tmp_path / "f", x[:4], normalize=(mean, std), tune=False)
    doc = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert doc["normalize"] == {"mean": [mean], "std": [std]}
    raw = (np.random.default_rng(0).random((3, 1, 28, 28)) * 255).astype(np.uint8)
    for rt in (load(tmp_path / "f"), load(export(seed_cnn, tmp_path / "m.onnx", x[:4], normalize=[[mean], [std]],
                                                 tune=False).path)):
        assert rt.normalize == {"mean": [mean], "std": [std]}
        expected = ((raw / 255.0 - mean) / std).astype(np.float32)
        np.testing.assert_allclose(rt.preprocess(raw), expected, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(rt.preprocess(raw / 255.0), expected, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            np.testing.assert_allclose(rt(rt.preprocess(raw)), seed_cnn(torch.from_numpy(expected)).numpy(), atol=1e-4)
    plain = load(export(seed_cnn, tmp_path / "p", x[:4], tune=False).path)
    assert plain.normalize is None and json.loads((tmp_path / "p" / "manifest.json").read_text())["normalize"] is None
    np.testing.assert_allclose(plain.preprocess(raw), raw / np.float32(255.0), rtol=1e-6)
    for bad, match in (((0.5, 0.0), "std must be"), ((0.5,), r"\(mean, std\)"), (([0.1, 0.2], 0.3), "2 values for 1"),
                       (("a", 1.0), "mean must be")):
        with pytest.raises(MocoError, match=match):
            export(seed_cnn, tmp_path / "bad", x[:4], normalize=bad, tune=False)
    (tmp_path / "f" / "manifest.json").write_text(json.dumps(dict(doc, normalize={"mean": [0.1], "std": [-1]})))
    with pytest.raises(MocoError, match="malformed.*std must be"):
        load(tmp_path / "f")


def test_the_empty_batch_probe_prints_no_onnxruntime_errors(tmp_path, capfd):
    # _runs_empty asks whether a graph runs on 0 samples (a GroupNorm's Reshape does not): the expected failure
    # was logged by onnxruntime as a red "[E:onnxruntime ...] Non-zero status code" line during a good export
    import onnx

    from moco.deploy.exporter import export_onnx
    from moco.deploy.fuse import _runs_empty

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.GroupNorm(2, 4), torch.nn.Flatten()).eval()
    export_onnx(model, torch.randn(2, 1, 8, 8), tmp_path / "g.onnx", output_names=["y"])
    capfd.readouterr()
    assert _runs_empty(onnx.load(str(tmp_path / "g.onnx"))) is False
    assert "onnxruntime" not in capfd.readouterr().err


def test_a_qat_model_deploys_its_own_int8_weights_not_a_second_quantization(tmp_path):
    # int8 used to be ONNX Runtime's quantization of the QAT graph's fake-quant float ops (Round, Div, Clip kept,
    # a second quantization on top); now it quantizes the float equivalent, whose weights are the QAT int8 grid
    import onnx

    from moco.approx import train_quant
    from moco.approx.quant import quant_layers

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 3))
    x = torch.randn(128, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    q = train_quant(model, (x, torch.randint(0, 3, (128,))), epochs=0, per_channel=True)
    res = export(q, tmp_path / "q", x[:4], int8=x, check=x, tune=False)
    assert any("QAT weights" in n for n in res.notes) and res.int8.agreement > 0.9
    ops = {n.op_type for n in onnx.load(str(tmp_path / "q" / "model.int8.onnx")).graph.node}
    assert "Round" not in ops and {"QuantizeLinear", "DequantizeLinear"} <= ops
    plain = dict(quant_layers(q))["0"].float_module()
    grid = plain.weight / dict(quant_layers(q))["0"].weight_scale().reshape(-1, 1, 1, 1)
    assert torch.allclose(grid, grid.round(), atol=1e-4)      # the QAT weights, on their int8 grid
    assert [n for n, _ in quant_layers(q)] == ["0", "3"]      # q keeps its QAT layers (a copy is exported)
    for _, layer in quant_layers(q):
        layer.multiplier = object()   # a layer simulating an approximate multiplier has no ONNX form
    with pytest.raises(MocoError, match="approximate multiplier"):
        export(q, tmp_path / "lut", x[:4])


class _TinyAttention(torch.nn.Module):
    """Patch tokens, a class token and one attention block (nn.MultiheadAttention or a TransformerEncoderLayer)."""

    def __init__(self, kind: str):
        super().__init__()
        self.patch = torch.nn.Conv2d(1, 8, 4, 4)
        self.cls = torch.nn.Parameter(torch.zeros(1, 1, 8))
        self.kind = kind
        if kind == "mha":
            self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        else:
            self.attn = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.attn(x, x, x, need_weights=False)[0] if self.kind == "mha" else self.attn(x)
        return self.fc(x[:, 0])


@pytest.mark.parametrize("kind", ["mha", "encoder"])
def test_attention_models_export_with_a_one_sample_example(kind, tmp_path):
    # under no_grad in eval mode attention runs a fused kernel the TorchScript exporter rejects; the fallback
    # exporter then fixed the batch at the example's 1 and the tuning crashed on its batch of 64 (a traceback)
    torch.manual_seed(0)
    model = _TinyAttention(kind).eval()
    x = torch.randn(20, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    res = export(model, tmp_path / kind, x[:1], check=x)
    assert res.fp32.agreement == 1.0 and res.fp32.max_abs_diff < 1e-4
    with torch.no_grad():
        np.testing.assert_allclose(load(tmp_path / kind)(x[:7]), model(x[:7]).numpy(), atol=1e-4)
    assert torch.backends.mha.get_fastpath_enabled()   # torch's switch is set back


def test_a_graph_with_a_fixed_batch_is_refused(seed_cnn, tmp_path):
    from moco.deploy.exporter import _check_dynamic_batch, export_onnx

    export_onnx(seed_cnn, torch.randn(2, 1, 28, 28), tmp_path / "fixed.onnx", dynamic_batch=False)
    with pytest.raises(RuntimeError, match="batches of 2 only"):
        _check_dynamic_batch(str(tmp_path / "fixed.onnx"))
    export_onnx(seed_cnn, torch.randn(1, 1, 28, 28), tmp_path / "dyn.onnx")
    _check_dynamic_batch(str(tmp_path / "dyn.onnx"))


def test_a_slow_graph_is_tuned_on_max_batch_samples_not_the_example(seed_cnn, x, tmp_path):
    # past the time budget the tuner timed x[:64] of a one-sample example, so moco run's int8 graphs were
    # tuned on batches of 1 (the fused graphs already tiled the example)
    from moco.deploy.exporter import _tune

    export(seed_cnn, tmp_path / "m", x[:1], tune=False)
    items = json.loads((tmp_path / "m" / "manifest.json").read_text())["graphs"]["fp32"]
    _tune(tmp_path / "m", items, [x[:1].numpy()], 1, repeats=1, rounds=1, budget_s=0.0, settle_s=0.0)
    assert items[0]["session"]["batch"] == 64


def test_re_exporting_into_a_folder_removes_the_graphs_it_no_longer_has(seed_cnn, x, tmp_path):
    # an FP32 export over an int8 one left model.int8.onnx beside the new manifest, looking current
    export(seed_cnn, tmp_path / "f", x[:4], int8=x[:32], tune=False)
    assert (tmp_path / "f" / "model.int8.onnx").is_file()
    (tmp_path / "f" / "notes.txt").write_text("mine")
    export(seed_cnn, tmp_path / "f", x[:4], tune=False)
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == ["manifest.json", "model.onnx", "notes.txt"]
