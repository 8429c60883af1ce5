import io
import json
import statistics
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import moco.bench.registry as registry
from moco.bench import (BASELINE_NAMES, BaselineSet, Comparison, baseline_variants, best_baseline, compare,
                        list_benchmarks, register, run_benchmark)
from moco.errors import MocoError

# ------------------------------------------------------------------------------------------- compare


def test_compare_interleaves_and_rotates_the_order_every_round():
    log = []
    variants = {name: (lambda batch, name=name: log.append(name)) for name in "abc"}
    batches = [torch.zeros(2, 3), torch.zeros(2, 3)]
    result = compare(variants, batches, warmup=1, repeats=4)
    warm = ["a", "a", "b", "b", "c", "c"]  # one run = every batch once
    rounds = [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    expected = warm + [name for order in rounds for name in order for _ in batches]
    assert log == expected
    assert [len(row.times) for row in result.rows] == [4, 4, 4]
    assert result.names == ("a", "b", "c") and result.baseline == "a"


class FakeTime:
    """A clock that advances only when a fake variant 'computes'."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def variant(self, durations):
        """A variant whose successive runs (one batch each) take ``durations`` seconds."""
        it = iter(durations)

        def fn(batch):
            self.now += next(it)

        return fn


def test_compare_statistics_and_ratios_on_a_fake_clock():
    clock = FakeTime()
    variants = {
        "slow": clock.variant([9.0, 4.0, 4.0, 5.0, 3.0]),  # first value: warm-up, never timed
        "fast": clock.variant([9.0, 1.0, 3.0, 2.0, 2.0]),
        "same": clock.variant([9.0, 4.0, 4.0, 4.0, 4.0]),
    }
    result = compare(variants, torch.zeros(5, 2), warmup=1, repeats=4, clock=clock)
    assert isinstance(result, Comparison)
    slow, fast, same = result.rows
    assert slow.times == (4.0, 4.0, 5.0, 3.0)
    assert (slow.median_s, slow.min_s, slow.max_s) == (4.0, 3.0, 5.0)
    assert (fast.median_s, fast.min_s, fast.max_s) == (2.0, 1.0, 3.0)
    assert slow.ratio == 1.0 and fast.ratio == 0.5 and same.ratio == 1.0
    assert result.ratio("fast") == 0.5
    assert result.fastest == "fast"
    assert result.best_excluding(["fast"]) == "slow"  # tie with "same": the first one wins
    assert result.samples_per_s("fast") == 2.5
    assert (result.n_batches, result.batch_size, result.batch_sizes, result.n_samples) == (1, 5, (5,), 5)
    assert (result.repeats, result.warmup) == (4, 1)
    assert result.threads == torch.get_num_threads() and result.torch_version == torch.__version__

    other = compare({k: clock.variant([2.0] * 3) for k in ("x", "y")} | {"z": clock.variant([1.0] * 3)},
                    torch.zeros(1, 1), baseline="z", warmup=0, repeats=3, clock=clock)
    assert other.ratio("x") == 2.0 and other.ratio("z") == 1.0 and other.baseline == "z"


def test_comparison_reports():
    clock = FakeTime()
    variants = {"eager": clock.variant([2.0] * 3), "onnx": clock.variant([0.84] * 3)}
    result = compare(variants, [torch.zeros(4, 1), torch.zeros(4, 1), torch.zeros(3, 1)], warmup=0, repeats=1,
                     clock=clock)
    assert result.rows[0].times == (6.0,)  # three batches of 2 s each
    assert result.batch_sizes == (3, 4) and result.n_samples == 11 and result.n_batches == 3
    text = result.to_text()
    assert "0.42x" in text and "1.00x" in text and "eager *" in text and "fastest: onnx" in text
    lines = text.splitlines()
    assert len({len(line) for line in lines[:4]}) == 1  # header, rule and rows are aligned
    data = json.loads(json.dumps(result.to_dict()))
    assert data["fastest"] == "onnx" and data["rows"][1]["ratio"] == pytest.approx(0.42)
    assert data["batch_sizes"] == [3, 4] and data["threads"] == torch.get_num_threads()
    df = result.to_dataframe()
    assert list(df.index) == ["eager", "onnx"] and df.loc["onnx", "ratio"] == pytest.approx(0.42)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(variants={}), "empty"),
    (dict(baseline="nope"), "baseline 'nope'"),
    (dict(repeats=0), "repeats"),
    (dict(warmup=-1), "warmup"),
    (dict(inputs=[]), "inputs is empty"),
    (dict(inputs=[torch.zeros(1), "x"]), "not a tensor"),
    (dict(variants={"a": 3}), "not a callable"),
])
def test_compare_rejects_bad_arguments(kwargs, needle):
    args = dict(variants={"a": lambda b: b}, inputs=torch.zeros(2, 2))
    args.update(kwargs)
    with pytest.raises(MocoError, match=needle):
        compare(args.pop("variants"), args.pop("inputs"), **args)


def test_comparison_lookups_fail_clearly():
    result = compare({"a": lambda b: b, "b": lambda b: b}, torch.zeros(1, 1), warmup=0, repeats=1)
    with pytest.raises(MocoError, match="no variant 'c'"):
        result.ratio("c")
    with pytest.raises(MocoError, match="leaves no variant"):
        result.best_excluding(["a", "b"])
    assert best_baseline(result, ["b", "compile"]) == "b"
    with pytest.raises(MocoError, match="none of"):
        best_baseline(result, ["eager"])


# ------------------------------------------------------------------------------------------ baselines


def tiny_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 5))


def test_all_four_baselines_agree_with_eager_and_bad_variants_are_excluded():
    model = tiny_cnn().train()  # a training-mode model must come back untouched
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(16, 1, 8, 8)
    eager_out = model.eval()(x).detach()
    model.train()

    def flipped(batch):  # wrong predictions
        return -model(batch)

    def softmax(batch):  # right predictions, wrong logits
        return torch.softmax(model(batch), dim=1)

    def crash(batch):
        raise RuntimeError("boom\nsecond line")

    base = baseline_variants(model, x, check_inputs=[x[:10], x[10:]],
                             extra={"flipped": flipped, "softmax": softmax, "crash": crash})
    assert isinstance(base, BaselineSet)
    assert base.names == BASELINE_NAMES, base.unavailable
    for name in BASELINE_NAMES:
        agreement = base.agreement[name]
        assert agreement.fraction == 1.0 and agreement.n_samples == 16
        assert agreement.max_abs_diff < 1e-4
        assert torch.allclose(base.variants[name](x), eager_out, atol=1e-5)
    assert set(base.unavailable) == {"flipped", "softmax", "crash"}
    assert "disagrees with eager" in base.unavailable["flipped"] and base.agreement["flipped"].fraction < 1.0
    assert "atol" in base.unavailable["softmax"] and base.agreement["softmax"].fraction == 1.0
    assert base.unavailable["crash"] == "failed on the check inputs: RuntimeError: boom"
    assert "crash" not in base.agreement
    # the caller's model is untouched: same weights, mode and memory format
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
        assert value.is_contiguous()  # not channels-last
    assert json.loads(json.dumps(base.to_dict()))["available"] == list(BASELINE_NAMES)
    text = base.to_text()
    assert "flipped" in text and "excluded" in text and "100.00%" in text
    # the variants are ready to time, on the shapes they were checked on
    result = compare(base.variants, [x[:10], x[10:]], warmup=1, repeats=1)
    assert result.names == BASELINE_NAMES and best_baseline(result) in BASELINE_NAMES


def test_channels_last_is_skipped_with_a_reason_for_2d_inputs(tmp_path):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    base = baseline_variants(mlp, torch.randn(5, 6), include=("eager", "channels_last", "onnxruntime"),
                             workdir=tmp_path)
    assert base.names == ("eager", "onnxruntime")
    assert "4-D" in base.unavailable["channels_last"]
    assert list(tmp_path.glob("*.onnx")), "the ONNX file is kept in workdir"
    assert str(tmp_path) in base.notes["onnxruntime"]
    assert base.variants["onnxruntime"](torch.randn(7, 6)).shape == (7, 3)  # dynamic batch axis


def test_a_failing_compile_is_recorded_not_raised(monkeypatch):
    def no_compiler(model, **kwargs):
        raise RuntimeError("InductorError: no working C++ compiler found\ndetails")

    monkeypatch.setattr(torch, "compile", no_compiler)
    base = baseline_variants(tiny_cnn(), torch.randn(4, 1, 8, 8), include=("eager", "compile"))
    assert base.names == ("eager",)
    assert base.unavailable["compile"] == "could not be built: RuntimeError: InductorError: no working C++ compiler found"


@pytest.mark.parametrize("kwargs,needle", [
    (dict(include=("eager", "tensorrt")), "unknown baseline"),
    (dict(extra={"eager": lambda b: b}), "clashes"),
    (dict(extra={"mine": 42}), "not a callable"),
    (dict(atol=-1.0), "atol"),
    (dict(check_inputs=[]), "empty"),
    (dict(check_inputs=torch.randn(2, 3)), "fails on a check batch"),
])
def test_baseline_variants_rejects_bad_arguments(kwargs, needle):
    with pytest.raises(MocoError, match=needle):
        baseline_variants(tiny_cnn(), torch.randn(2, 1, 8, 8), **kwargs)


def test_baseline_variants_needs_logits():
    class Scalar(nn.Module):
        def forward(self, x):
            return x.sum(dim=(1, 2, 3))

    with pytest.raises(MocoError, match="logits tensor"):
        baseline_variants(Scalar(), torch.randn(2, 1, 8, 8), include=("eager",))


# ------------------------------------------------------------------------------------------- registry


@pytest.fixture
def private_registry(monkeypatch):
    """A copy of the registry for this test only (test benchmarks do not leak into others)."""
    registry.list_benchmarks()  # import the built-in benchmarks into the real registry first
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    return registry


def test_run_benchmark_prints_a_table_then_json_with_meta_last(private_registry, tmp_path):
    @register("tiny-test", "a tiny benchmark for the tests")
    def tiny(quick, seed, out=print):
        out("name  value")
        out("x     1.00")
        return {"quick": quick, "draw": torch.rand(1).item(), "n": 3}

    stream = io.StringIO()
    path = tmp_path / "out" / "result.json"
    result = run_benchmark("tiny-test", quick=True, seed=5, json_path=path, stream=stream)
    lines = stream.getvalue().splitlines()
    assert lines[:2] == ["name  value", "x     1.00"]
    last = json.loads(lines[-1])
    assert last == result == json.loads(path.read_text())
    meta = last["meta"]
    assert meta["seed"] == 5 and meta["quick"] is True and meta["benchmark"] == "tiny-test"
    assert meta["torch"] == torch.__version__ and meta["threads"] == torch.get_num_threads()
    for key in ("moco", "python", "platform", "wall_s", "peak_rss_mb", "interop_threads"):
        assert key in meta
    assert meta["peak_rss_mb"] > 10
    again = run_benchmark("tiny-test", quick=True, seed=5, stream=io.StringIO())
    assert again["draw"] == result["draw"]  # seeded
    assert ("tiny-test", "a tiny benchmark for the tests") in list_benchmarks()


def test_run_benchmark_writes_to_stdout_by_default(private_registry, capsys):
    register("tiny-stdout", "prints")(lambda quick, seed, out=print: {"ok": True})
    run_benchmark("tiny-stdout")
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1])["ok"] is True


def test_unknown_benchmark_lists_the_registered_ones():
    with pytest.raises(MocoError, match="unknown benchmark 'nope'.*baselines"):
        run_benchmark("nope")


def test_register_refuses_a_taken_name(private_registry):
    register("tiny-dup", "one")(lambda quick, seed, out=print: {})
    with pytest.raises(MocoError, match="already registered"):
        @register("tiny-dup", "two")
        def other(quick, seed, out=print):
            return {}


def test_builtin_benchmarks_are_listed_lazily():
    names = dict(list_benchmarks())
    assert set(registry.BENCHMARK_MODULES) <= set(names)
    assert "60,000 images" in names["baselines"]


def test_baselines_benchmark_runs_on_stand_ins(private_registry, monkeypatch):
    """The ``baselines`` benchmark end to end, with a tiny model and random images instead of MNIST."""
    import moco.data
    import moco.train

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, stride=3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 9 * 9, 10)).eval()
    images = torch.randn(10_000, 1, 28, 28)
    calls = []

    def fake_pretrained(name, dataset, **kwargs):
        calls.append((name, dataset, kwargs))
        return model, {"accuracy_test": 0.1, "dataset": dataset, "data_source": "random", "checkpoint": "none"}

    def fake_mnist(root=None, train=True, **kwargs):
        return SimpleNamespace(tensors=lambda: (images if train else images[:2000], torch.zeros(len(images))))

    monkeypatch.setattr(moco.train, "pretrained", fake_pretrained)
    monkeypatch.setattr(moco.data, "load_mnist", fake_mnist)
    monkeypatch.setattr(torch, "compile", lambda m, **kw: m)  # the real compile is tested above, once
    stream = io.StringIO()
    result = run_benchmark("baselines", quick=True, seed=3, stream=stream)
    assert calls == [("seed_cnn", "mnist", {"seed": 3, "quick": True})]
    assert result["n_images"] == 10_000 and result["batch_size"] == 1000 and result["accuracy_test"] == 0.1
    assert result["unavailable"] == {}
    for name in ("compile", "channels_last", "onnxruntime"):
        assert result[f"ratio_{name}"] > 0
    assert result["best_baseline"] in BASELINE_NAMES
    assert result["ratio_best"] == min(row["ratio"] for row in result["comparison"]["rows"])
    assert result["comparison"]["repeats"] == 3 and result["comparison"]["n_batches"] == 10
    text = stream.getvalue()
    assert "same argmax" in text and "ratio" in text and "best baseline" in text
    assert json.loads(text.splitlines()[-1])["meta"]["quick"] is True
    assert statistics.median(result["comparison"]["rows"][0]["times"]) > 0


def test_onnx_falls_back_to_the_dynamo_exporter(monkeypatch):
    real_export = torch.onnx.export

    def no_torchscript(*args, dynamo=True, **kwargs):
        if not dynamo:
            raise RuntimeError("the TorchScript exporter is gone")
        return real_export(*args, dynamo=dynamo, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", no_torchscript)
    base = baseline_variants(tiny_cnn(), torch.randn(4, 1, 8, 8), include=("eager", "onnxruntime"))
    assert base.names == ("eager", "onnxruntime"), base.unavailable
    assert "dynamo=True" in base.notes["onnxruntime"]
    assert base.variants["onnxruntime"](torch.randn(3, 1, 8, 8)).shape == (3, 5)  # dynamic batch axis


def test_stage_table_shows_each_steps_contribution():
    from moco.bench.baselines import stage_table

    text = stage_table([{"stage": "original, ONNX Runtime FP32", "ratio": 1.0, "agreement": 1.0},
                        {"stage": "+ pruning", "ratio": 0.5, "accuracy": 0.9},
                        {"stage": "+ int8", "ratio": 0.25, "agreement": 0.99, "macs_ratio": 0.1}])
    lines = text.splitlines()
    assert lines[0].startswith("stage") and "step speed-up" in lines[0]
    assert "2.00x" in lines[3] and "2.00x" in lines[4] and "99.0000%" in lines[4] and "0.100" in lines[4]


def test_compare_deployed_times_a_small_model_against_the_original_in_onnxruntime():
    from moco.bench.baselines import compare_deployed

    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).eval()
    small = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 5)).eval()
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 5, (64,))
    summary, cmp = compare_deployed(original, small, list(x.split(32)), (x, y), int8=x, repeats=2,
                                    baselines=("eager", "onnxruntime"))
    assert {"onnxruntime", "small/eager", "small/deployed-fp32", "small/deployed-int8"} <= set(cmp.names)
    assert summary["deployed_precision"] in ("fp32", "int8") and summary["best_baseline"] in ("eager", "onnxruntime")
    fp32 = summary["deployed"]["fp32"]
    with torch.no_grad():
        assert fp32["accuracy_test"] == float((small(x).argmax(1) == y).float().mean())
    assert fp32["ratio_vs_onnxruntime_fp32"] == cmp.timing("small/deployed-fp32").median_s / cmp.timing("onnxruntime").median_s
    assert [s["stage"] for s in summary["stages"]][0] == "original, ONNX Runtime FP32"
    # conv 8x9x36 + linear 288x5 MACs against 2x9x36 + 72x5: a quarter, on every stage of the small model
    assert [s["macs_ratio"] for s in summary["stages"]] == pytest.approx([1.0, 0.25, 0.25, 0.25], rel=1e-6)
    json.dumps(summary)


def test_compose_benchmark_is_registered():
    assert "compose-fashion" in dict(list_benchmarks())
