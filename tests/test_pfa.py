"""Principal Filter Analysis (moco.compress.pfa): streaming statistics, recipes, unit selection, display."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from moco.compress.pfa import PFA, LayerStatistics, PFARecipe, RunningCovariance
from moco.compress.pfa.strategies import energy_count, kl_count, kl_divergence, size_threshold
from moco.errors import MocoError


def _batches(x, sizes):
    start = 0
    for b in sizes:
        yield {"layer": x[start : start + b]}
        start += b
    assert start == len(x)


# ---------------------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("sizes", [[1000], [1, 2, 997], [7] * 142 + [6], [500, 0, 500]])
def test_streamed_covariance_equals_numpy_for_any_batching(sizes):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1000, 12)) @ rng.normal(size=(12, 12)) + rng.normal(size=12) * 5
    pfa = PFA.introspect(_batches(x.astype(np.float32), sizes), progress=False)
    st = pfa.statistics["layer"]
    ref = x.astype(np.float32).astype(np.float64)
    assert st.count == 1000
    np.testing.assert_allclose(st.mean, ref.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(st.covariance, np.cov(ref.T), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(st.eigenvalues, np.sort(np.linalg.eigvalsh(np.cov(ref.T)))[::-1], rtol=1e-9)
    assert st.covariance.dtype == np.float64 and np.all(np.diff(st.eigenvalues) <= 0)


def test_covariance_stays_accurate_for_responses_with_a_large_mean():
    rng = np.random.default_rng(1)
    noise = rng.normal(size=(20_000, 4)) * np.array([1e-3, 2e-3, 1.0, 1e-2])
    x = 1e6 + noise  # float64 responses with a huge offset and tiny spread
    acc = RunningCovariance()
    for chunk in np.array_split(x, 40):
        acc.update(chunk)
    exact = np.cov(noise.T)
    np.testing.assert_allclose(acc.covariance(), exact, rtol=1e-6, atol=1e-12)
    # what raw sums would give (E[xx^T] - E[x]E[x]^T): the tiny variances are lost entirely
    n = len(x)
    naive = (x.T @ x - n * np.outer(x.mean(0), x.mean(0))) / (n - 1)
    assert abs(naive[0, 0] - exact[0, 0]) > 100 * exact[0, 0]


def test_merging_accumulators_equals_one_pass():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 5)) + 100
    a, b, whole = RunningCovariance(), RunningCovariance(), RunningCovariance()
    a.update(x[:120])
    b.update(x[120:])
    whole.update(x)
    a.merge(b)
    assert a.count == 300
    np.testing.assert_allclose(a.covariance(), whole.covariance(), rtol=1e-12)
    np.testing.assert_allclose(a.covariance(), np.cov(x.T), rtol=1e-10)


def test_model_introspection_streams_the_max_pooled_responses_and_leaves_the_model_alone():
    from moco.capture import SpatialPool, capture

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 5, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(5 * 8 * 8, 4)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(97, 1, 12, 12)
    pfa = PFA.introspect(x, model=model, layers=["2", "4"], batch_size=10, progress=False)
    ref = capture(model, x, ["2", "4"], processor=SpatialPool("max"), progress=False)
    for name in ["2", "4"]:
        st = pfa.statistics[name]
        np.testing.assert_allclose(st.covariance, np.cov(ref[name].astype(np.float64).T), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(st.mean, ref[name].mean(0), rtol=1e-5, atol=1e-6)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # BN stats untouched
    assert not any(m._forward_hooks for m in model.modules())
    # default layers: every conv/linear but the classifier, analysed after their BatchNorm/ReLU chain;
    # avg pooling is the mean over space; response="output" takes the conv's own output
    avg = PFA.introspect(x, model=model, pooling="avg", progress=False)
    assert avg.layers == ["0", "3"]
    assert dict(avg.responses) == {"0": "0 -> 1 -> 2", "3": "3 -> 4"}
    act0 = model.eval()[:3](x).mean(dim=(2, 3)).detach().double().numpy()
    np.testing.assert_allclose(avg.statistics["0"].covariance, np.cov(act0.T), rtol=1e-6, atol=1e-9)
    raw = PFA.introspect(x, model=model, pooling="avg", response="output", progress=False)
    out0 = model.eval()[0](x).mean(dim=(2, 3)).detach().double().numpy()
    np.testing.assert_allclose(raw.statistics["0"].covariance, np.cov(out0.T), rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------------------ recipes
def test_kl_counts_on_hand_made_spectra():
    assert kl_count([3.0] * 8) == 8  # flat: keep all
    assert kl_divergence([3.0] * 8) == pytest.approx(0.0, abs=1e-12)
    assert kl_count([5.0, 0, 0, 0, 0]) == 1  # one direction carries everything
    assert kl_divergence([5.0, 0, 0, 0, 0]) == pytest.approx(math.log(5))
    assert kl_count([1.0, 1.0, 0.0, 0.0]) == 2  # H = log 2, n H / log n = 2 exactly
    # p = (1/2, 1/4, 1/8, 1/8): H = 1.75 log 2, ratio 0.875, 4 * 0.875 = 3.5 -> 4
    assert kl_divergence([4.0, 2.0, 1.0, 1.0]) == pytest.approx(0.25 * math.log(2))
    assert kl_count([4.0, 2.0, 1.0, 1.0]) == 4
    # 16 units, two equal eigenvalues: ratio log 2 / log 16 = 1/4 -> 4
    assert kl_count([1.0, 1.0] + [0.0] * 14) == 4
    assert kl_count([7.0]) == 1


def test_energy_counts_on_hand_made_spectra():
    spectrum = [5.0, 3.0, 1.0, 1.0]  # cumulative energy 0.5, 0.8, 0.9, 1.0
    assert energy_count(spectrum, 0.5) == 1
    assert energy_count(spectrum, 0.8) == 2  # reaching the threshold exactly is enough
    assert energy_count(spectrum, 0.81) == 3
    assert energy_count(spectrum, 0.99) == 4
    assert energy_count(spectrum, 1.0) == 4
    assert energy_count(spectrum, 0.5, min_kept_count=3) == 3
    assert energy_count(spectrum, 0.0) == 1  # never zero units
    assert energy_count(spectrum, 0.5, min_kept_count=10) == 4  # never more than the layer has


def test_size_finds_one_global_threshold():
    spectra = {"peaked": np.array([1.0, 0, 0, 0]), "flat": np.ones(4)}
    t = size_threshold(spectra, 0.5)
    assert 0.5 < t <= 0.75  # flat keeps ceil(4 t) = 3, peaked 1: total 4 = half of 8 units
    pfa = PFA.from_statistics({name: LayerStatistics.from_covariance(np.diag(e)) for name, e in spectra.items()})
    recipes = pfa.get_recipe(strategy=PFA.Strategy.Size(relative_size=0.5))
    assert {n: r.recommended_count for n, r in recipes.items()} == {"peaked": 1, "flat": 3}
    assert recipes["flat"].diagnostics.energy_threshold == pytest.approx(t)
    # units beyond the last non-zero eigenvalue hold no energy: no threshold keeps them
    full = pfa.get_recipe(strategy=PFA.Strategy.Size(relative_size=1.0))
    assert {n: r.recommended_count for n, r in full.items()} == {"peaked": 1, "flat": 4}
    floor = pfa.get_recipe(strategy=PFA.Strategy.Size(relative_size=0.1, min_kept_count=2))
    assert {n: r.recommended_count for n, r in floor.items()} == {"peaked": 2, "flat": 2}


def test_recipe_diagnostics_and_defaults():
    cov = np.diag([4.0, 2.0, 1.0, 1.0])
    pfa = PFA.from_statistics({"a": LayerStatistics.from_covariance(cov, count=100)})
    kl = pfa.get_recipe()["a"]  # defaults: KL + L1Max (as DNIKit)
    assert isinstance(kl, PFARecipe)
    assert (kl.original_count, kl.recommended_count, len(kl.units_to_keep)) == (4, 4, 4)
    assert kl.diagnostics.strategy == "PFA KL" and kl.diagnostics.unit_strategy == "L1Max"
    energy = pfa.get_recipe(strategy=PFA.Strategy.Energy(energy_threshold=0.75, min_kept_count=1),
                            unit_strategy=PFA.UnitSelectionStrategy.AbsMax())["a"]
    assert energy.recommended_count == 2
    assert energy.diagnostics.kept_energy == pytest.approx(0.75)
    assert energy.diagnostics.units_ratio == pytest.approx(0.5)
    assert energy.diagnostics.kl_divergence == pytest.approx(0.25 * math.log(2))
    # uncorrelated units tie everywhere: the documented rule drops the lower index of the first pair
    assert energy.units_to_keep == frozenset({2, 3})
    with pytest.raises(dataclasses.FrozenInstanceError):
        energy.recommended_count = 3
    with pytest.raises(ValueError):
        pfa.statistics["a"].covariance[0, 0] = 1.0  # read-only arrays


# ------------------------------------------------------------------------------------ unit selection
def _stats_from_corr(corr, variances=None):
    corr = np.asarray(corr, dtype=float)
    sd = np.sqrt(np.ones(len(corr)) if variances is None else np.asarray(variances, dtype=float))
    return LayerStatistics.from_covariance(corr * np.outer(sd, sd))


CORR = [
    [1.00, 0.95, 0.60, 0.00],
    [0.95, 1.00, 0.55, 0.10],
    [0.60, 0.55, 1.00, 0.60],
    [0.00, 0.10, 0.60, 1.00],
]


@pytest.mark.parametrize("strategy,keep,expected", [
    ("AbsMax", 3, {1, 2, 3}),  # pair (0, 1) at 0.95; unit 0's next coefficient 0.60 > 0.55 -> drop 0
    ("AbsMax", 2, {1, 3}),  # then pair (2, 3)/(1, 2) at 0.60: (2, 3), unit 2's next 0.55 > 0.10 -> drop 2
    ("L1Max", 3, {0, 1, 3}),  # sums 1.55, 1.60, 1.75, 0.70 -> drop 2
    ("L1Max", 2, {0, 3}),  # then 0.95, 1.05, 0.10 -> drop 1
    # least correlated pair (0, 3) at 0.00; others ascending: unit 0 [0.60, 0.95], unit 3 [0.10, 0.60]
    # -> the smaller sequence (unit 3) goes
    ("AbsMin", 3, {0, 1, 2}),
    ("AbsMin", 2, {0, 1}),  # then pair (1, 2) at 0.55: unit 1 [0.95] vs unit 2 [0.60] -> drop 2
    ("L1Min", 3, {0, 1, 2}),  # smallest sum 0.70 -> drop 3
])
def test_unit_selection_on_a_hand_made_correlation_matrix(strategy, keep, expected):
    pfa = PFA.from_statistics({"l": _stats_from_corr(CORR)})
    sel = getattr(PFA.UnitSelectionStrategy, strategy)()
    recipe = pfa.get_recipe(strategy=PFA.Strategy.Energy(energy_threshold=0.0, min_kept_count=keep),
                            unit_strategy=sel)["l"]
    assert recipe.units_to_keep == frozenset(expected)
    # scaling the units (covariance vs correlation) changes nothing
    scaled = PFA.from_statistics({"l": _stats_from_corr(CORR, variances=[9.0, 0.25, 4.0, 1e-3])})
    assert sel.select(scaled.statistics["l"].covariance, keep).tolist() == sorted(expected)


def test_abs_max_breaks_ties_with_the_next_coefficients():
    corr = np.array([
        [1.0, 0.9, 0.4, 0.3],
        [0.9, 1.0, 0.4, 0.1],
        [0.4, 0.4, 1.0, 0.0],
        [0.3, 0.1, 0.0, 1.0],
    ])
    sel = PFA.UnitSelectionStrategy.AbsMax()
    # pair (0, 1); second coefficients tie (0.4), third decides: unit 0 has 0.3 > 0.1 -> drop unit 0
    assert sel.select(corr, 3).tolist() == [1, 2, 3]
    swap = corr[[1, 0, 2, 3]][:, [1, 0, 2, 3]]  # exchange units 0 and 1: now unit 1 goes
    assert sel.select(swap, 3).tolist() == [0, 2, 3]


def test_inactive_units_are_removed_first_and_fill_only_when_needed():
    cov = np.zeros((5, 5))
    cov[:4, :4] = np.asarray(CORR)
    cov[4, 4] = 1e-9  # variance below 1e-6 x the largest: inactive
    for name in ["AbsMax", "AbsMin", "L1Max", "L1Min"]:
        sel = getattr(PFA.UnitSelectionStrategy, name)()
        assert sel.select(cov, 4).tolist() == [0, 1, 2, 3]
        assert sel.select(cov, 5).tolist() == [0, 1, 2, 3, 4]
    # with epsilon 0 unit 4 counts as active (uncorrelated with all): AbsMax then drops unit 0 instead
    assert PFA.UnitSelectionStrategy.AbsMax(inactive_epsilon=0.0).select(cov, 4).tolist() == [1, 2, 3, 4]


def test_duplicated_and_dead_filters_are_found_in_a_real_conv_layer():
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 4, 3)
    with torch.no_grad():
        conv.weight[1] = 2.0 * conv.weight[0]  # unit 1 = 2 x unit 0: perfectly correlated after ReLU + max
        conv.bias[1] = 2.0 * conv.bias[0]
        conv.weight[3] = 0.0  # dead unit: constant response
        conv.bias[3] = 0.0
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(4 * 10 * 10, 3))
    pfa = PFA.introspect(torch.randn(400, 1, 12, 12), model=model, layers="1", progress=False)
    recipe = pfa.get_recipe(strategy=PFA.Strategy.Energy(energy_threshold=1.0))["1"]
    assert recipe.recommended_count == 2
    assert 2 in recipe.units_to_keep and 3 not in recipe.units_to_keep
    assert len(recipe.units_to_keep & {0, 1}) == 1
    assert PFA.keep({"1": recipe}, rename={"1": "0"}) == {"0": sorted(recipe.units_to_keep)}



def test_partial_keep_scales_the_reduction_and_keeps_the_strategy_order():
    from moco.compress.pfa import partial_keep

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 10 * 10, 3))
    pfa = PFA.introspect(torch.randn(300, 1, 12, 12), model=model, layers="1", progress=False)
    recipe = pfa.get_recipe(strategy=PFA.Strategy.Size(relative_size=0.25))
    n, k = 16, recipe["1"].recommended_count
    assert k == 4
    assert partial_keep(recipe, pfa, 0.0) == {"1": list(range(16))}
    half = partial_keep(recipe, pfa, 0.5)["1"]
    assert len(half) == n - round(0.5 * (n - k)) == 10 and half == sorted(half)
    full = partial_keep(recipe, pfa, 1.0)["1"]
    assert len(full) == k and set(full) <= set(half)  # L1Max picks greedily: a smaller set is a prefix
    with pytest.raises(MocoError, match="fraction must be in"):
        partial_keep(recipe, pfa, 1.5)
    with pytest.raises(MocoError, match="no statistics"):
        partial_keep({"other": recipe["1"]}, pfa, 0.5)
    assert len(partial_keep(recipe, pfa, 0.5, round_to=8)["1"]) == 8  # 10 -> the nearest multiple of 8
    assert len(partial_keep(recipe, pfa, 0.0, round_to=8)["1"]) == 16
    assert len(partial_keep(recipe, pfa, 1.0, round_to=8)["1"]) == 8  # 4 -> at least one multiple
    with pytest.raises(MocoError, match="round_to must be"):
        partial_keep(recipe, pfa, 0.5, round_to=0)
    from moco.profile import nchwc_block_size

    block = nchwc_block_size()  # "auto": this CPU's ONNX Runtime block (8 or 16); the 16-unit layer allows both
    assert len(partial_keep(recipe, pfa, 0.0, round_to="auto")["1"]) == 16
    assert len(partial_keep(recipe, pfa, 1.0, round_to="AUTO")["1"]) == block


def test_nchwc_block_size_follows_the_cpu_flags():
    from moco.profile import cpu_flags, cpu_name, nchwc_block_size

    assert nchwc_block_size(frozenset({"sse2", "avx2", "fma"})) == 8
    assert nchwc_block_size(frozenset({"avx2", "avx512f", "avx512bw"})) == 16
    assert nchwc_block_size(frozenset()) == 8
    assert nchwc_block_size() in (8, 16)
    assert isinstance(cpu_flags(), frozenset) and cpu_name()


@pytest.mark.parametrize("count, n, round_to, expected", [
    (9, 16, 8, 8), (13, 16, 8, 16), (37, 64, 8, 40), (3, 8, 8, 8), (10, 12, 8, 8), (12, 12, 8, 12), (5, 9, None, 5),
    (5, 9, 1, 5), (19, 32, 16, 16)])
def test_rounded_count(count, n, round_to, expected):
    from moco.compress.pfa import rounded_count

    assert rounded_count(count, n, round_to) == expected


# ------------------------------------------------------------------------------------------ failures
def test_failed_responses_name_the_reason():
    rng = np.random.default_rng(3)
    batches = [{"wide": rng.normal(size=(5, 8)), "narrow": rng.normal(size=(5, 2)),
                "flat": np.ones((5, 3)), "nan": np.vstack([rng.normal(size=(4, 2)), [[np.nan, 1.0]]])}]
    pfa = PFA.introspect(batches, progress=False)
    assert pfa.layers == ["narrow"]
    assert "only 5 samples for 8 units" in pfa.failed_responses["wide"]
    assert "zero variance" in pfa.failed_responses["flat"]
    assert "NaN or inf" in pfa.failed_responses["nan"]
    assert set(pfa.get_recipe()) == {"narrow"}
    empty = PFA.introspect(batches, layers=["wide"], progress=False)
    with pytest.raises(MocoError, match="no layer could be analysed"):
        empty.get_recipe()


def test_clear_errors():
    rng = np.random.default_rng(4)
    good = [{"a": rng.normal(size=(20, 3))}]
    pfa = PFA.introspect(good, progress=False)
    with pytest.raises(MocoError, match="energy_threshold is a fraction"):
        PFA.Strategy.Energy(energy_threshold=99)
    with pytest.raises(MocoError, match="relative_size"):
        PFA.Strategy.Size(relative_size=0.0)
    with pytest.raises(MocoError, match="min_kept_count"):
        PFA.Strategy.KL(min_kept_count=-1)
    with pytest.raises(TypeError, match=r"note the \(\)"):
        pfa.get_recipe(strategy=PFA.Strategy.KL)
    with pytest.raises(TypeError, match="unit_strategy"):
        pfa.get_recipe(unit_strategy="AbsMax")
    with pytest.raises(MocoError, match="pooling must be"):
        PFA.introspect(good, pooling="median")
    with pytest.raises(TypeError, match="pass model="):
        PFA.introspect(torch.randn(4, 1, 8, 8))
    with pytest.raises(MocoError, match="never appeared"):
        PFA.introspect(good, layers=["b"], progress=False)
    with pytest.raises(MocoError, match="earlier batches had 3"):
        PFA.introspect([{"a": np.ones((4, 3))}, {"a": np.ones((4, 5))}], progress=False)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 2))
    with pytest.raises(MocoError, match="no module named 'relu'"):
        PFA.introspect(torch.randn(4, 1, 8, 8), model=model, layers=["relu"], progress=False)
    with pytest.raises(MocoError, match="could not run on input shape"):
        PFA.introspect(torch.randn(4, 3, 8, 8), model=model, layers=["1"], progress=False)
    recipes = pfa.get_recipe()
    with pytest.raises(MocoError, match="unknown column"):
        PFA.show(recipes, include_columns=["nope"])
    with pytest.raises(MocoError, match="unknown visualisation"):
        PFA.show(recipes, kind="pie")
    with pytest.raises(MocoError, match="disagree"):
        PFA.show(recipes, vis_type=PFA.VisType.TABLE, kind="chart")
    with pytest.raises(TypeError, match="show\\(\\) takes"):
        PFA.show({"a": 1})


# ------------------------------------------------------------------------------------------- display
def test_show_table_and_chart(tmp_path):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))
    pfa = PFA.introspect([{"conv1": x, "conv2": x[:, :4]}], progress=False)
    kl = pfa.get_recipe()
    e99 = pfa.get_recipe(strategy=PFA.Strategy.Energy(energy_threshold=0.99, min_kept_count=1))
    table = PFA.show(kl)
    assert list(table.columns) == ["layer name", "original count", "recommended count", "units to keep"]
    assert table["layer name"].tolist() == ["conv1", "conv2"]
    assert table["original count"].tolist() == [6, 4]
    both = PFA.show((kl, e99), include_columns=["layer_name", "recommended count"], path=tmp_path / "t.csv")
    assert list(both.columns) == ["recipe", "layer name", "recommended count"]
    assert both["recipe"].tolist() == ["PFA KL, L1Max"] * 2 + ["PFA Energy(0.99), L1Max"] * 2
    assert (tmp_path / "t.csv").read_text().startswith("recipe,layer name,recommended count")
    everything = PFA.show({"kl": kl}, include_columns=[])
    assert {"KL divergence", "kept energy", "units ratio", "PFA strategy"} <= set(everything.columns)
    ax = PFA.show({"kl": kl, "energy 0.99": e99}, vis_type=PFA.VisType.CHART, path=tmp_path / "c.png")
    assert ax.get_ylabel() == "number of units"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["conv1", "conv2"]
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_vgg_bn_zoo_model():
    from moco.models import create, get_spec

    model = create("vgg_bn")
    assert isinstance(model, nn.Sequential)
    assert sum(p.numel() for p in model.parameters()) == 288_170
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert convs == ["0", "3", "7", "10", "14", "17"]
    assert [model[int(n)].out_channels for n in convs] == [32, 32, 64, 64, 128, 128]
    assert model.eval()(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert get_spec("vgg_bn").dataset == "fashion_mnist"
    small = create("vgg_bn", widths=(4, 8), convs_per_stage=1, num_classes=3)
    assert small.eval()(torch.zeros(1, 1, 28, 28)).shape == (1, 3)
    with pytest.raises(ValueError, match="positive int"):
        create("vgg_bn", widths=(8, 0))


def test_pfa_fashion_maps_block_responses_to_their_convs_and_sizes_by_macs():
    from moco.bench.bench_pfa_fashion import _size_for_macs, block_responses
    from moco.models import create
    from moco.profile import profile

    torch.manual_seed(0)
    model = create("vgg_bn", widths=(8, 8, 16, 16), num_classes=4).eval()
    responses = block_responses(model)
    assert responses == {"2": "0", "5": "3", "9": "7", "12": "10"}
    x = torch.randn(64, 1, 28, 28)
    pfa = PFA.introspect(x, model=model, layers=list(responses), batch_size=32, progress=False)
    fraction, reduction = _size_for_macs(pfa, model, responses, 2.0, x[:1])
    assert 0 < fraction < 1 and reduction >= 2.0
    from moco.compress.surgery import apply

    recipes = pfa.get_recipe(strategy=PFA.Strategy.Size(relative_size=fraction, min_kept_count=1))
    small = apply(model, PFA.keep(recipes, rename=responses), example_input=x[:1])
    macs = profile(model, x[:1], latency=False).totals.macs / profile(small, x[:1], latency=False).totals.macs
    assert macs == pytest.approx(reduction)


# ------------------------------------------------------------------------------- DNIKit compatibility
def test_dnikit_names_producer_epsilon_and_failed_responses_list():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
    x[:, 5] = 2.0  # a constant (inactive) unit
    seen = []

    def producer(batch_size):  # DNIKit's Producer protocol: producer(batch_size) -> batches
        seen.append(batch_size)
        for i in range(0, len(x), batch_size):
            yield {"conv": x[i:i + batch_size], "tiny": x[i:i + batch_size, :5][:1]}

    pfa = PFA.introspect(producer, batch_size=100, epsilon_inactive=1e-8)
    assert seen == [100] and pfa.epsilon_inactive == 1e-8
    assert pfa.failed_responses == ["tiny"] and "only 3 samples" in pfa.failed_responses["tiny"]
    recipe = pfa.get_recipe()["conv"]  # KL + L1Max, as DNIKit
    assert recipe.diagnostics.unit_strategy == "L1Max"
    assert recipe.original_output_count == recipe.original_count == 6
    assert recipe.recommended_output_count == recipe.recommended_count
    assert recipe.number_inactive_units == 1
    removed = recipe.maximally_correlated_units
    assert set(removed) == set(range(6)) - recipe.units_to_keep
    assert removed[0] == 5  # the inactive unit is removed first and listed first
    # more units asked for than are active: moco fills the count with inactive units and says so
    everything = pfa.get_recipe(strategy=PFA.Strategy.Energy(energy_threshold=1.0, min_kept_count=6))["conv"]
    assert everything.recommended_count == 6 and everything.diagnostics.inactive_kept == 1
    assert "only 5 are active" in everything.diagnostics.note and everything.diagnostics.note in everything.to_text()
    # KL's interpolation function and Size's epsilon_energy, as DNIKit's
    half = pfa.get_recipe(strategy=PFA.Strategy.KL(interpolation_function=lambda kl, top: 0.5))["conv"]
    assert half.recommended_count == 3
    with pytest.raises(MocoError, match="must lie in"):
        pfa.get_recipe(strategy=PFA.Strategy.KL(interpolation_function=lambda kl, top: 2.0))
    size = pfa.get_recipe(strategy=PFA.Strategy.Size(relative_size=1.0, epsilon_energy=0.2))["conv"]
    assert size.diagnostics.energy_threshold == pytest.approx(0.8)
    # show(exclude_columns=...) and the result protocol of recipes
    recipes = pfa.get_recipe()
    table = PFA.show(recipes, include_columns=[], exclude_columns=["units to keep", "KL divergence"])
    assert "units to keep" not in table.columns and "kept energy" in table.columns
    with pytest.raises(MocoError, match="no columns left"):
        PFA.show(recipes, include_columns=["layer name"], exclude_columns=["layer_name"])
    assert recipes.to_dict()["conv"]["units_to_keep"] == sorted(recipes["conv"].units_to_keep)
    assert str(recipes) == recipes.to_text() and "units kept" in recipes.to_text()
    assert list(recipes.to_frame()["layer name"]) == ["conv"]
    import json

    json.dumps(recipes.to_dict())


class _FunctionalBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))  # functional activation
        y = self.conv2(y).relu() + y  # method activation, then a residual add
        return self.fc(y.mean((2, 3)))


def test_layers_named_by_their_conv_are_read_after_the_functional_activation():
    torch.manual_seed(0)
    model = _FunctionalBlock().eval()
    x = torch.randn(64, 1, 8, 8)
    pfa = PFA.introspect(x, model=model, layers=["conv1", "conv2"], batch_size=16, progress=False)
    assert dict(pfa.responses) == {"conv1": "conv1 -> bn1 -> relu", "conv2": "conv2 -> .relu()"}
    with torch.no_grad():
        a1 = torch.relu(model.bn1(model.conv1(x)))
        a2 = model.conv2(a1).relu()
    for name, act in (("conv1", a1), ("conv2", a2)):
        ref = act.amax(dim=(2, 3)).double().numpy()
        np.testing.assert_allclose(pfa.statistics[name].covariance, np.cov(ref.T), rtol=1e-6, atol=1e-9)
    # recipes are keyed by the convs: surgery takes them without a rename map
    from moco.compress.surgery import apply

    recipes = pfa.get_recipe(strategy=PFA.Strategy.Size(relative_size=0.5))
    small = apply(model, PFA.keep({"conv1": recipes["conv1"]}), x[:1])  # conv2 is tied to conv1 by the add
    assert small(x).shape == (64, 3) and small.conv1.out_channels == recipes["conv1"].recommended_count
    # every recipe: the tied layers' recipes differ, surgery refuses them; with the model, one per group is kept
    from moco.compress.surgery import SurgeryError

    assert recipes["conv1"].units_to_keep != recipes["conv2"].units_to_keep
    with pytest.raises(SurgeryError, match="conflicting keep sets"):
        apply(model, PFA.keep(recipes), x[:1])
    keep = PFA.keep(recipes, model=model, example_input=x[:1])
    assert keep == {"conv1": recipes["conv1"].keep_indices()}
    assert apply(model, keep, x[:1]).conv2.out_channels == recipes["conv1"].recommended_count
    with pytest.raises(MocoError, match="both model and example_input"):
        PFA.keep(recipes, model=model)
    assert not any(m._forward_hooks for m in model.modules())


# ------------------------------------------------------------------------------------ targeted loop
def test_pfa_loop_on_a_batchnorm_residual_se_model_stops_within_budget():
    from test_user_models import SEResNet

    from moco.compress.pfa import PFALoop
    from moco.train import evaluate, fit

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    # a learnable toy task: the class is the quadrant with the brightest blob
    x = torch.randn(600, 1, 16, 16, generator=g) * 0.3
    y = torch.randint(0, 4, (600,), generator=g)
    for i in range(600):
        r, c = divmod(int(y[i]), 2)
        x[i, 0, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] += 1.0
    model = SEResNet(width=8, num_classes=4)
    fit(model, (x[:400], y[:400]), epochs=8, lr=1e-2, batch_size=32, progress=False)
    assert evaluate(model, (x[400:], y[400:])).accuracy > 0.9
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loop = PFALoop(fractions=(0.1, 0.5, 1.0), max_drop=0.05, finetune_epochs=3, finetune_samples=400,
                   introspect_samples=300, lr=3e-3, batch_size=32).fit(model, (x[:400], y[:400]), (x[400:], y[400:]))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the caller's model is untouched
    assert len(loop.log_) >= 1 and loop.log_[0].fraction == 0.1
    accepted = [s for s in loop.log_ if s.accepted]
    assert accepted and all(s.drop <= 0.05 + 1e-12 for s in accepted)
    assert [s.macs for s in loop.log_] == sorted((s.macs for s in loop.log_), reverse=True)
    assert all(s.accepted for s in loop.log_[:-1])  # the loop stops at the first step over budget
    if accepted:
        assert loop.fraction_ == accepted[-1].fraction and loop.macs_ == accepted[-1].macs < loop.base_macs_
    else:
        assert loop.fraction_ == 0.0 and loop.macs_ == loop.base_macs_
    assert loop.small_(x[:2]).shape == (2, 4)
    # tied residual layers keep one recipe per group
    assert "block1.conv2" in loop.dropped_recipes_ or "block1.conv2" not in loop.recipes_
    d = loop.to_dict()
    import json

    json.dumps(d)
    assert str(loop) == loop.to_text()
    assert ("validation accuracy" in loop.to_text()) != ("unchanged" in loop.to_text())
    assert list(loop.to_frame().columns)[:3] == ["fraction", "units", "macs"]
    with pytest.raises(MocoError, match="fractions must be increasing"):
        PFALoop(fractions=(1.0, 0.5)).fit(model, (x[:400], y[:400]), (x[400:], y[400:]))
    with pytest.raises(MocoError, match="round_to must be"):
        PFALoop(round_to="8").fit(model, (x[:400], y[:400]), (x[400:], y[400:]))
    rounded = PFALoop(fractions=(1.0,), max_drop=1.0, finetune_epochs=1, finetune_samples=64, introspect_samples=300,
                      batch_size=32, round_to=4).fit(model, (x[:400], y[:400]), (x[400:], y[400:]))
    assert rounded.keep_ and all(len(v) % 4 == 0 or len(v) == rounded.recipes_[k].original_count  # a small layer
                                 for k, v in rounded.keep_.items())                                # stays whole
    assert any(len(v) < rounded.recipes_[k].original_count for k, v in rounded.keep_.items())
    # rounding to more units than a layer has keeps it whole: such a fraction is skipped, not fine-tuned for nothing
    whole = PFALoop(fractions=(0.5, 1.0), max_drop=1.0, finetune_epochs=1, finetune_samples=64, introspect_samples=300,
                    batch_size=32, round_to=64).fit(model, (x[:400], y[:400]), (x[400:], y[400:]))
    assert whole.skipped_fractions_ == (0.5, 1.0) and not whole.log_ and whole.fraction_ == 0.0
    assert all(torch.equal(v, before[k]) for k, v in whole.small_.state_dict().items())
    assert whole.to_dict()["skipped_fractions"] == [0.5, 1.0]
    assert "no fraction (0.5, 1) removes a unit after rounding to multiples of 64" in whole.to_text()


def test_a_default_layer_run_twice_is_reported_not_fatal():
    # weight sharing: the conv runs twice per forward pass, so it has no one response; PFA stopped with "runs more
    # than once" although the user never named it. Now it is in failed_responses and the rest is analysed.
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.shared = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
            self.c, self.fc = nn.Conv2d(6, 4, 3, padding=1), nn.Linear(4, 3)

        def forward(self, x):
            x = torch.relu(self.shared(torch.relu(self.shared(torch.relu(self.a(x))))))
            return self.fc(torch.relu(self.c(x)).mean((2, 3)))

    torch.manual_seed(0)
    model = Shared().eval()
    pfa = PFA.introspect(torch.rand(64, 1, 8, 8), model=model)
    assert list(pfa.failed_responses) == ["shared"] and "runs 2 times" in pfa.failed_responses["shared"]
    assert set(pfa.statistics) == {"a", "c"}
    with pytest.raises(MocoError, match="runs more than once"):   # named explicitly: capture refuses it
        PFA.introspect(torch.rand(16, 1, 8, 8), model=model, layers=["shared"])


def test_default_layers_that_never_run_as_modules_are_reported():
    # attention's out_proj (and a fused encoder layer's feed-forward Linears) never run as modules: PFA stopped
    # with "modules ['attn.out_proj'] did not run during the forward pass" though the user named no layer
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = nn.Conv2d(1, 8, 4, 4)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            x = self.patch(x).flatten(2).transpose(1, 2)
            return self.fc((x + self.attn(x, x, x, need_weights=False)[0]).mean(1))

    torch.manual_seed(0)
    pfa = PFA.introspect(torch.rand(64, 1, 8, 8), model=Attn().eval())
    assert list(pfa.failed_responses) == ["attn.out_proj"] and "never called" in pfa.failed_responses["attn.out_proj"]
    assert list(pfa.statistics) == ["patch"]
