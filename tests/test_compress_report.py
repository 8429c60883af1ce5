"""The before/after report: counts from the profiler, accuracies, side-by-side timing of every variant."""

import json

import pytest
import torch

from moco.compress.prune import masked_copy
from moco.compress.report import CompressionReport, compare_models
from moco.errors import MocoError
from moco.models import create
from moco.profile import profile
from moco.train import evaluate


@pytest.fixture(scope="module")
def models():
    """fashion_cnn and a smaller one of the same family (what surgery would give), plus labelled test data."""
    torch.manual_seed(0)
    original = create("fashion_cnn", c1_channels=8, c2_channels=8, hidden=20, input_size=12, init="orthogonal").eval()
    small = create("fashion_cnn", c1_channels=2, c2_channels=3, hidden=5, input_size=12).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 1, 12, 12, generator=g)
    y = torch.randint(0, 10, (300,), generator=g)
    return original, small, (x, y)


@pytest.fixture(scope="module")
def report(models):
    original, small, data = models
    masked = masked_copy(original, {"0": [0, 1], "2": [0, 1, 2], "5": list(range(5))})
    return compare_models(original, small, data, example_input=data[0][:1], batch_size=100, repeats=2,
                          masked=masked, baselines=("eager", "channels_last"), small_variants=("eager",), seed=3)


def test_report_counts_come_from_the_profiler(models, report):
    original, small, (x, _) = models
    assert isinstance(report, CompressionReport)
    p0, p1 = profile(original, x[:1], latency=False), profile(small, x[:1], latency=False)
    assert report.macs_before == p0.totals.macs and report.macs_after == p1.totals.macs
    assert report.flops_before == p0.totals.flops
    assert report.macs_reduction == pytest.approx(p0.totals.macs / p1.totals.macs)
    assert report.params_before == sum(p.numel() for p in original.parameters())
    assert report.params_after == sum(p.numel() for p in small.parameters())
    assert report.params_reduction == pytest.approx(report.params_before / report.params_after)
    assert report.macs_reduction > 5 and report.params_reduction > 5


def test_report_accuracies_and_ratios_are_consistent(models, report):
    original, small, data = models
    assert report.accuracy_before == evaluate(original, data).accuracy
    assert report.accuracy_after == evaluate(small, data).accuracy
    assert report.accuracy_drop_points == pytest.approx(100 * (report.accuracy_before - report.accuracy_after))
    assert report.accuracy_masked is not None and report.n_samples == 300
    cmp = report.comparison
    assert set(cmp.names) == {"original/eager", "original/channels_last", "small/eager", "masked/eager"}
    assert cmp.n_samples == 300 and cmp.batch_size == 100 and cmp.repeats == 2
    med = {n: cmp.timing(n).median_s for n in cmp.names}
    assert report.ratio_vs_eager == pytest.approx(med["small/eager"] / med["original/eager"])
    assert report.best_baseline == min(["original/eager", "original/channels_last"], key=med.get)
    assert report.ratio_vs_best_baseline == pytest.approx(med["small/eager"] / med[report.best_baseline])
    assert report.ratio_masked_vs_eager == pytest.approx(med["masked/eager"] / med["original/eager"])


def test_report_dict_is_json_and_has_the_contract_keys(report):
    d = json.loads(json.dumps(report.to_dict()))
    for key in ("params_before", "params_after", "params_reduction", "macs_before", "macs_after", "macs_reduction",
                "accuracy_before", "accuracy_after", "accuracy_drop_points", "ratio_vs_eager",
                "ratio_vs_best_baseline", "best_baseline", "timings", "ratio_masked_vs_eager"):
        assert key in d
    assert set(d["timings"]) == set(report.comparison.names)
    assert d["seed"] == 3
    text = report.to_text()
    assert "MACs / sample" in text and "original/eager" in text and "zero-masked" in text


def test_report_without_masked_model(models):
    original, small, data = models
    rep = compare_models(original, small, data, example_input=data[0][:1], batch_size=150, repeats=1,
                         baselines=("eager",), small_variants=("eager",), max_timing_samples=150)
    assert rep.ratio_masked_vs_eager is None and rep.accuracy_masked is None
    assert rep.comparison.n_samples == 150 and rep.n_samples == 300


def test_report_errors(models):
    original, small, (x, y) = models
    kw = dict(example_input=x[:1])
    with pytest.raises(MocoError, match="empty"):
        compare_models(original, small, (x[:0], y[:0]), **kw)
    with pytest.raises(MocoError, match="labels"):
        compare_models(original, small, x, **kw)
    with pytest.raises(MocoError, match="batch_size"):
        compare_models(original, small, (x, y), batch_size=0, **kw)
    with pytest.raises(MocoError, match="repeats"):
        compare_models(original, small, (x, y), repeats=0, **kw)
    with pytest.raises(TypeError, match="small"):
        compare_models(original, "small", (x, y), **kw)
    with pytest.raises(MocoError, match="eager"):
        compare_models(original, small, (x, y), baselines=("channels_last",), **kw)


def test_report_result_protocol(report):
    assert str(report) == report.to_text()
    frame = report.to_frame()
    assert list(frame["quantity"]) == ["params", "macs_per_sample", "flops_per_sample", "accuracy"]
    assert frame["original"].tolist()[1] == report.macs_before and frame["compressed"].tolist()[3] == report.accuracy_after
