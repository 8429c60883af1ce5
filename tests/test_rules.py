"""moco.rules: AnalyticsEngine, LinearRule / RuleSet, thresholds, persistence and errors.

Synthetic setting: K=4 Gaussian clusters in D=64 that overlap a little; the "model" is a fixed linear
classifier (nearest centre), so its predictions are a linear function of the features. A rule can be
near-perfect away from the cluster boundaries but not on the overlap, which is what the certified
``max_error`` has to control. Precision is always checked on a *fresh* draw from the same
distribution, never on the samples the rule was fitted or certified on.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import pickle

import numpy as np
import pytest
import torch

from moco.errors import MocoError
from moco.rules import (
    AnalyticsEngine,
    LinearRule,
    RuleSet,
    ThresholdChoice,
    load_rule,
    load_rules,
    select_threshold,
)
from moco.stats import min_samples_for

K, D = 4, 64
SCALE = 0.45  # centre spread: about 1.5 % of samples are near a boundary
N = 6000
MAX_ERROR = 0.02  # generous, so that fresh-draw checks are many standard errors away from flaky


def _classifier():
    rng = np.random.default_rng(1000)
    centers = rng.normal(size=(K, D)) * SCALE
    return centers, centers.T.copy(), -0.5 * (centers**2).sum(axis=1)


def make_data(seed: int, n: int):
    """``(features float32 [n, D], predictions int64 [n], scores float32 [n, K])`` of the fixed classifier."""
    centers, w, b = _classifier()
    rng = np.random.default_rng(seed)
    latent = rng.integers(0, K, n)
    x = (centers[latent] + rng.normal(size=(n, D))).astype(np.float32)
    scores = (x @ w + b).astype(np.float32)
    return x, scores.argmax(axis=1).astype(np.int64), scores


@pytest.fixture(scope="module")
def data():
    return make_data(0, N)


@pytest.fixture(scope="module")
def fresh():
    """An independent draw from the same distribution: the population the certificate speaks about."""
    return make_data(12345, 20000)


@pytest.fixture(scope="module")
def engine(data):
    x, preds, _ = data
    return AnalyticsEngine(x, {"predictions": preds}, epochs=3, progress=False)


@pytest.fixture(scope="module")
def rule_out(engine):
    return engine.compute_linear_sufficient_rule("predictions", 1, fit_on_val=True, max_error=MAX_ERROR)


@pytest.fixture(scope="module")
def margin_set(engine):
    return engine.compute_linear_sufficient_rules("predictions", max_error=MAX_ERROR)


# ---------------------------------------------------------------------------- one rule


@pytest.mark.parametrize("cls", range(K))
def test_single_rule_precision_on_fresh_data_meets_max_error(engine, fresh, cls):
    rule, out = engine.compute_linear_sufficient_rule("predictions", cls, fit_on_val=True, max_error=MAX_ERROR)
    x, preds, _ = fresh
    fired = rule.fires(x)
    assert fired.dtype == np.bool_ and fired.shape == (len(x),)
    # the rule is useful (covers most of its class) ...
    assert fired.mean() > 0.15, out
    # ... and where it fires, the model predicts its class at least 1 - max_error of the time
    assert (preds[fired] == cls).mean() >= 1 - MAX_ERROR


@pytest.mark.parametrize("seed", [1, 2])
def test_single_rule_precision_holds_for_other_engine_seeds(data, fresh, seed):
    x, preds, _ = data
    ae = AnalyticsEngine(x, {"predictions": preds}, epochs=3, progress=False, seed=seed)
    rule, out = ae.compute_linear_sufficient_rule("predictions", 2, max_error=MAX_ERROR)
    xf, pf, _ = fresh
    fired = rule.fires(xf)
    assert fired.sum() > 1000
    assert (pf[fired] == 2).mean() >= 1 - MAX_ERROR
    assert out["certified_precision"] <= out["precision_val"]


def test_out_reports_coverage_and_precision_on_both_splits(engine, data, rule_out):
    rule, out = rule_out
    x, preds, _ = data
    for split, rows in (("fit", engine.fit_rows_), ("val", engine.val_rows_)):
        assert out[f"n_{split}"] == len(rows)
        fired = rule.fires(x[rows])
        wrong = preds[rows] != 1
        # the report describes exactly what the returned rule does on that split
        assert out[f"fired_{split}"] == int(fired.sum()) > 0
        assert out[f"errors_{split}"] == int((fired & wrong).sum())
        assert out[f"coverage_{split}"] == pytest.approx(fired.mean())
        assert out[f"precision_{split}"] == pytest.approx(1 - (fired & wrong).sum() / fired.sum())
        assert 0.0 < out[f"coverage_{split}"] <= 1.0 and 0.0 < out[f"precision_{split}"] <= 1.0
    # disjoint held-out split covering all samples
    assert len(np.intersect1d(engine.fit_rows_, engine.val_rows_)) == 0
    assert out["n_fit"] + out["n_val"] == N
    # the certificate is a lower bound below the held-out measurement, and meets the request
    assert out["certified"] is True
    assert out["certified_precision"] <= out["precision_val"]
    assert out["certified_precision"] >= 1 - MAX_ERROR
    assert out["class"] == 1 and out["column"] == "predictions" and out["kind"] == "margin"
    assert out["max_error"] == MAX_ERROR and out["confidence"] == 0.95 and out["fit_on_val"] is True
    assert out["threshold"] == pytest.approx(rule.threshold)
    assert out["needed_samples"] == min_samples_for(MAX_ERROR, 0.95)
    assert out["fit_seconds"] >= 0


def test_rule_class_threshold_and_decision_function(rule_out, data):
    rule, _ = rule_out
    x, _, _ = data
    assert isinstance(rule, LinearRule)
    assert rule.class_ == 1 and isinstance(rule.class_, int)
    assert isinstance(rule.threshold, float) and math.isfinite(rule.threshold)
    assert rule.n_features == D and rule.num_classes == K
    scores = rule.decision_function_(x)
    assert isinstance(scores, np.ndarray) and scores.shape == (N,)
    assert np.isfinite(scores).all()
    np.testing.assert_array_equal(rule.fires(x), scores > rule.threshold)
    # torch in, torch out; same values
    xt = torch.from_numpy(x)
    st = rule.decision_function_(xt)
    ft = rule.fires(xt)
    assert isinstance(st, torch.Tensor) and isinstance(ft, torch.Tensor) and ft.dtype == torch.bool
    np.testing.assert_allclose(st.numpy(), scores, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(ft.numpy(), rule.fires(x))
    # unflattened activations (as a conv layer gives them) are flattened
    np.testing.assert_array_equal(rule.fires(x.reshape(N, 4, 4, 4)), rule.fires(x))
    # float64 input is accepted
    np.testing.assert_array_equal(rule.fires(x.astype(np.float64)), rule.fires(x))


def test_single_rule_assign_exits_with_its_class(rule_out, fresh):
    rule, _ = rule_out
    x, _, _ = fresh
    mask, classes = rule.assign(x)
    assert mask.dtype == torch.bool and mask.shape == (len(x),)
    assert classes.dtype == torch.long and classes.shape == (len(x),)
    np.testing.assert_array_equal(mask.numpy(), rule.fires(x))
    assert (classes[mask] == 1).all()


def test_fit_on_val_false_is_not_certified(engine, fresh):
    rule, out = engine.compute_linear_sufficient_rule("predictions", 3, fit_on_val=False, max_error=MAX_ERROR)
    assert out["certified"] is False and out["fit_on_val"] is False
    assert out["n_fit"] == out["n_val"] == N  # chosen on the same (all) samples
    x, preds, _ = fresh
    fired = rule.fires(x)
    assert fired.any() and (preds[fired] == 3).mean() > 0.95


def test_rule_kind_linear_fires_on_raw_score(engine, data):
    rule, out = engine.compute_linear_sufficient_rule("predictions", 0, max_error=0.05, kind="linear")
    x, _, _ = data
    assert rule.kind == "linear" and out["kind"] == "linear"
    np.testing.assert_array_equal(rule.fires(x), rule.decision_function_(x) > rule.threshold)


# ---------------------------------------------------------------------------- rule sets


def test_rule_set_assign_matches_predictions(margin_set, fresh):
    rules, out = margin_set
    assert isinstance(rules, RuleSet) and not isinstance(rules, LinearRule)
    assert rules.rule_classes == tuple(range(K))
    x, preds, _ = fresh
    mask, classes = rules.assign(x)
    assert mask.dtype == torch.bool and mask.shape == (len(x),)
    assert classes.dtype == torch.long and classes.shape == (len(x),)
    m, c = mask.numpy(), classes.numpy()
    assert m.mean() > 0.5
    assert (c[m] == preds[m]).mean() >= 1 - MAX_ERROR
    # every class gets exits
    assert set(np.unique(c[m])) == set(range(K))
    assert out["certified"] is True
    assert out["certified_precision"] <= out["precision_val"]
    assert out["certified_precision"] >= 1 - MAX_ERROR
    assert set(out["per_class"]) == {str(k) for k in range(K)}
    assert sum(d["fired_val"] for d in out["per_class"].values()) == out["fired_val"]
    assert sum(d["errors_val"] for d in out["per_class"].values()) == out["errors_val"]


def test_margin_rules_never_fire_together(margin_set, fresh):
    rules, _ = margin_set
    x, _, _ = fresh
    fires = rules.fires(x)
    assert fires.shape == (len(x), K) and fires.dtype == np.bool_
    assert fires.sum(axis=1).max() <= 1
    mask, classes = rules.assign(x)
    np.testing.assert_array_equal(mask.numpy(), fires.any(axis=1))
    rows = np.flatnonzero(fires.any(axis=1))
    np.testing.assert_array_equal(classes.numpy()[rows], np.array(rules.rule_classes)[fires[rows].argmax(axis=1)])


def test_rule_set_for_some_classes_only(engine, fresh):
    rules, out = engine.compute_linear_sufficient_rules("predictions", values=[1, 3], max_error=MAX_ERROR)
    assert rules.rule_classes == (1, 3) and out["classes"] == [1, 3]
    x, preds, _ = fresh
    mask, classes = rules.assign(x)
    m, c = mask.numpy(), classes.numpy()
    assert m.any() and set(np.unique(c[m])) <= {1, 3}
    assert (c[m] == preds[m]).mean() >= 1 - MAX_ERROR


@pytest.mark.parametrize("policy", ["abstain", "max_score"])
def test_engine_linear_rule_set_policy(engine, fresh, policy):
    rules, out = engine.compute_linear_sufficient_rules("predictions", max_error=0.05, kind="linear", policy=policy)
    assert rules.kind == "linear" and rules.policy == policy and out["policy"] == policy
    x, preds, _ = fresh
    fires = rules.fires(x)
    mask, classes = rules.assign(x)
    n_fired = fires.sum(axis=1)
    expected = n_fired == 1 if policy == "abstain" else n_fired >= 1
    np.testing.assert_array_equal(mask.numpy(), expected)
    m = mask.numpy()
    if m.any():
        assert (classes.numpy()[m] == preds[m]).mean() >= 1 - 0.05


def _hand_made(kind: str, policy: str) -> RuleSet:
    # D=3, K=3: scores are s0 = x0, s1 = x1, s2 = x2; rules for classes 0 and 1 only
    return RuleSet(np.eye(3, dtype=np.float32), np.zeros(3, np.float32), (0, 1, 2), {0: 1.0, 1: 0.5},
                   kind=kind, policy=policy)


HAND_X = np.array(
    [
        [2.0, 0.6, 0.0],  # both fire; excess 1.0 (class 0) vs 0.1 (class 1)
        [1.2, 3.0, 0.0],  # both fire; excess 0.2 vs 2.5
        [2.0, 0.0, 0.0],  # only class 0
        [0.0, 0.9, 0.0],  # only class 1
        [0.0, 0.0, 5.0],  # neither (class 2 has no rule)
        [1.0, 0.5, 0.0],  # exactly at both thresholds: "> threshold" means no fire
    ],
    dtype=np.float32,
)


def test_linear_policy_abstain_does_not_exit_where_two_rules_fire():
    rules = _hand_made("linear", "abstain")
    fires = rules.fires(HAND_X)
    np.testing.assert_array_equal(fires, [[1, 1], [1, 1], [1, 0], [0, 1], [0, 0], [0, 0]])
    mask, classes = rules.assign(HAND_X)
    np.testing.assert_array_equal(mask.numpy(), [False, False, True, True, False, False])
    assert classes[2] == 0 and classes[3] == 1


def test_linear_policy_max_score_picks_the_larger_excess():
    rules = _hand_made("linear", "max_score")
    mask, classes = rules.assign(torch.from_numpy(HAND_X))
    np.testing.assert_array_equal(mask.numpy(), [True, True, True, True, False, False])
    np.testing.assert_array_equal(classes.numpy()[:4], [0, 1, 0, 1])


def test_hand_made_margin_rules_use_the_gap_to_the_best_other_class():
    rules = _hand_made("margin", "abstain")
    # margins: row0 (2, .6, 0) -> class 0 margin 1.4 > 1; row1 -> class 1 margin 1.8 > .5; row2 -> class 0 margin 2;
    # row3 -> class 1 margin .9 > .5; row4: class 2 is top, no rule; row5: class 0 margin .5, not > 1
    fires = rules.fires(HAND_X)
    np.testing.assert_array_equal(fires, [[1, 0], [0, 1], [1, 0], [0, 1], [0, 0], [0, 0]])
    mask, classes = rules.assign(HAND_X)
    np.testing.assert_array_equal(mask.numpy(), [True, True, True, True, False, False])
    np.testing.assert_array_equal(classes.numpy()[:4], [0, 1, 0, 1])


def test_rule_set_rejects_bad_kind_policy_and_shapes():
    w, b = np.eye(3, dtype=np.float32), np.zeros(3, np.float32)
    with pytest.raises(MocoError, match="kind"):
        RuleSet(w, b, (0, 1, 2), {0: 1.0}, kind="quadratic")
    with pytest.raises(MocoError, match="policy"):
        RuleSet(w, b, (0, 1, 2), {0: 1.0}, policy="first")
    with pytest.raises(MocoError, match="shapes"):
        RuleSet(w, np.zeros(2, np.float32), (0, 1, 2), {0: 1.0})
    with pytest.raises(MocoError, match="not among"):
        RuleSet(w, b, (0, 1, 2), {5: 1.0})


# ---------------------------------------------------------------------------- persistence


def test_rule_save_load_round_trip(tmp_path, rule_out, data):
    rule, _ = rule_out
    x, _, _ = data
    written = rule.save(tmp_path / "r")
    assert written == tmp_path / "r.json"
    assert (tmp_path / "r.json").is_file() and (tmp_path / "r.npz").is_file()
    for path in (tmp_path / "r", tmp_path / "r.json", tmp_path / "r.npz", str(tmp_path / "r")):
        loaded = load_rule(path)
        assert isinstance(loaded, LinearRule)
        assert loaded.class_ == rule.class_ and loaded.threshold == rule.threshold
        assert loaded.kind == rule.kind and loaded.layer == rule.layer
        np.testing.assert_array_equal(loaded.decision_function_(x), rule.decision_function_(x))
        np.testing.assert_array_equal(loaded.fires(x), rule.fires(x))
        assert loaded.metadata == json.loads(json.dumps(rule.metadata))
    # the JSON has no pickled content and holds the metadata as written
    on_disk = json.loads((tmp_path / "r.json").read_text())
    assert on_disk["class"] == 1 and on_disk["threshold"] == rule.threshold
    assert on_disk["weights"]["file"] == "r.npz" and on_disk["weights"]["shape"] == [D, K]


def test_metadata_is_json_and_pickle_able(rule_out, margin_set):
    rule, out = rule_out
    md = rule.metadata
    back = json.loads(json.dumps(md))
    assert back == md
    assert md["class"] == 1 and md["threshold"] == rule.threshold
    assert md["kind"] == "margin" and md["n_features"] == D and md["classes"] == list(range(K))
    assert md["info"]["precision_val"] == out["precision_val"]
    assert md["info"]["certified_precision"] == out["certified_precision"]
    assert pickle.loads(pickle.dumps(md)) == md  # the seed pickles it
    rules, _ = margin_set
    assert json.loads(json.dumps(rules.metadata)) == rules.metadata


def test_rule_set_round_trip_and_load_rule_refuses_a_set(tmp_path, margin_set, fresh):
    rules, _ = margin_set
    x, _, _ = fresh
    rules.save(tmp_path / "set.json")
    loaded = load_rules(tmp_path / "set")
    assert type(loaded) is RuleSet
    assert loaded.rule_classes == rules.rule_classes and loaded.policy == rules.policy
    assert loaded.thresholds == rules.thresholds
    m0, c0 = rules.assign(x)
    m1, c1 = loaded.assign(x)
    assert torch.equal(m0, m1) and torch.equal(c0[m0], c1[m1])
    with pytest.raises(MocoError, match="load_rules"):
        load_rule(tmp_path / "set")


def test_rule_that_never_fires_round_trips(tmp_path):
    rule = LinearRule(np.ones((3, 2), np.float32), np.zeros(2, np.float32), (0, 1), {1: math.inf})
    assert not rule.fires(np.ones((4, 3), np.float32)).any()
    assert rule.metadata["threshold"] is None
    rule.save(tmp_path / "never")
    loaded = load_rule(tmp_path / "never")
    assert loaded.threshold == math.inf and not loaded.fires(np.ones((4, 3), np.float32)).any()


def _rewrite_json(path, edit):
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def _corrupt_version(tmp_path):
    _rewrite_json(tmp_path / "r.json", lambda m: m.update(version=99))


def _swap_npz(tmp_path):
    other = LinearRule(np.ones((D, K), np.float32), np.zeros(K, np.float32), tuple(range(K)), {0: 0.0})
    other.save(tmp_path / "other")
    (tmp_path / "r.npz").write_bytes((tmp_path / "other.npz").read_bytes())


def _wrong_shape(tmp_path):
    buf = io.BytesIO()
    np.savez(buf, weight=np.ones((D - 1, K), np.float32), bias=np.zeros(K, np.float32))
    blob = buf.getvalue()
    (tmp_path / "r.npz").write_bytes(blob)  # consistent checksum, wrong shape
    _rewrite_json(tmp_path / "r.json", lambda m: m["weights"].update(sha256=hashlib.sha256(blob).hexdigest()))


def _missing_npz(tmp_path):
    (tmp_path / "r.npz").unlink()


def _not_json(tmp_path):
    (tmp_path / "r.json").write_bytes(b"\x80\x03 this is a pickle, not JSON")


def _other_json(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"model": "resnet", "epochs": 3}))


def _missing_weights_entry(tmp_path):
    _rewrite_json(tmp_path / "r.json", lambda m: m.pop("weights"))


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (_corrupt_version, "version 99"),
        (_swap_npz, "checksum"),
        (_wrong_shape, "shape"),
        (_missing_npz, "does not exist"),
        (_not_json, "not valid JSON"),
        (_other_json, "not a moco rule file"),
        (_missing_weights_entry, "weights"),
    ],
    ids=["version", "npz-swapped", "weight-shape", "npz-missing", "not-json", "other-json", "no-weights-entry"],
)
def test_load_rejects_damaged_files_with_a_clear_error(tmp_path, rule_out, corrupt, message):
    rule, _ = rule_out
    rule.save(tmp_path / "r")
    corrupt(tmp_path)
    with pytest.raises(MocoError, match=message) as info:
        load_rule(tmp_path / "r")
    assert isinstance(info.value, ValueError)


def test_load_missing_file(tmp_path):
    with pytest.raises(MocoError, match="does not exist"):
        load_rule(tmp_path / "nothing")


# ---------------------------------------------------------------------------- clear errors


def test_class_nobody_predicts(engine):
    with pytest.raises(MocoError, match=r"no sample has predictions == 7.*classes present: \[0, 1, 2, 3\]"):
        engine.compute_linear_sufficient_rule("predictions", 7)
    with pytest.raises(MocoError, match="predictions == 9"):
        engine.compute_linear_sufficient_rules("predictions", values=[0, 9])


def test_class_absent_below_the_top_class():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 8)).astype(np.float32)
    preds = np.where(x[:, 0] > 0, 3, 0)  # classes 1 and 2 never predicted
    ae = AnalyticsEngine(x, {"predictions": preds}, epochs=1, progress=False)
    with pytest.raises(MocoError, match=r"predictions == 2.*\[0, 3\]"):
        ae.compute_linear_sufficient_rule("predictions", 2)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_features_with_nan_or_inf(data, bad):
    x, preds, _ = data
    x = x[:600].copy()
    x[417, 5] = bad
    with pytest.raises(MocoError, match="NaN or inf"):
        ae = AnalyticsEngine(x, {"predictions": preds[:600]}, epochs=1, progress=False)
        ae.compute_linear_sufficient_rule("predictions", 1, max_error=0.1)
    with pytest.raises(MocoError, match="NaN or inf"):
        ae = AnalyticsEngine(torch.from_numpy(x), {"predictions": preds[:600]}, epochs=1, progress=False)
        ae.compute_linear_sufficient_rules("predictions", max_error=0.1)


def test_column_length_mismatch(data):
    x, preds, _ = data
    with pytest.raises(MocoError, match=r"'predictions' has 5999 rows but features have 6000"):
        AnalyticsEngine(x, {"predictions": preds[:-1]}, progress=False)


def test_unknown_column(engine):
    with pytest.raises(MocoError, match=r"unknown column 'labels'.*predictions"):
        engine.compute_linear_sufficient_rule("labels", 1)
    with pytest.raises(MocoError, match="unknown column"):
        engine.compute_linear_sufficient_rules("labels")


def test_bad_features_and_columns(data):
    x, preds, _ = data
    with pytest.raises(TypeError, match="numpy array"):
        AnalyticsEngine(x.tolist(), {"predictions": preds})
    with pytest.raises(MocoError, match=r"\[N, D\]"):
        AnalyticsEngine(x[:, 0], {"predictions": preds})
    with pytest.raises(MocoError, match="at least one label column"):
        AnalyticsEngine(x, {})
    with pytest.raises(MocoError, match="class indices"):
        AnalyticsEngine(x, {"predictions": preds + 0.5})
    with pytest.raises(MocoError, match="negative"):
        AnalyticsEngine(x, {"predictions": preds - 1})
    with pytest.raises(MocoError, match="val_fraction"):
        AnalyticsEngine(x, {"predictions": preds}, val_fraction=1.0)


def test_too_few_held_out_samples_says_how_many_are_needed(data):
    x, preds, _ = data
    ae = AnalyticsEngine(x[:400], {"predictions": preds[:400]}, epochs=1, progress=False)
    needed = min_samples_for(1e-4, 0.95)
    assert needed == 29956
    with pytest.raises(MocoError, match=rf"too few held-out samples of class 1 .*max_error=0.0001.*need at least {needed}"):
        ae.compute_linear_sufficient_rule("predictions", 1, max_error=1e-4)
    with pytest.raises(MocoError, match=rf"need at least {needed}"):
        ae.compute_linear_sufficient_rules("predictions", max_error=1e-4)


def test_assign_with_wrong_feature_width(rule_out, margin_set, data):
    rule, _ = rule_out
    rules, _ = margin_set
    x, _, _ = data
    for r in (rule, rules):
        with pytest.raises(MocoError, match=rf"features \[N, {D}\], got shape \(10, {D + 1}\)"):
            r.assign(np.zeros((10, D + 1), np.float32))
    with pytest.raises(MocoError, match=rf"\[N, {D}\]"):
        rule.fires(torch.zeros(10, D - 1))
    with pytest.raises(MocoError, match=rf"\[N, {D}\]"):
        rule.decision_function_(x[0])  # one sample without its batch dimension


def test_unknown_kind_is_rejected(engine):
    with pytest.raises(MocoError, match="kind"):
        engine.compute_linear_sufficient_rule("predictions", 1, max_error=MAX_ERROR, kind="quadratic")


@pytest.mark.parametrize("kind", ["margin", "linear"])
def test_empty_values_is_a_clear_error(engine, kind):
    # an empty class list (e.g. after filtering) should say so, not fail inside max() or talk about sample counts
    with pytest.raises(MocoError, match="values|no class|empty"):
        engine.compute_linear_sufficient_rules("predictions", values=[], max_error=MAX_ERROR, kind=kind)


# ---------------------------------------------------------------------------- storage and column forms


@pytest.fixture(scope="module")
def small(data):
    x, preds, scores = data
    return x[:3000], preds[:3000], scores[:3000]


def _rule_summary(features, columns, column="predictions"):
    ae = AnalyticsEngine(features, columns, epochs=3, progress=False, seed=7)
    rule, out = ae.compute_linear_sufficient_rule(column, 2, max_error=0.05)
    return rule, out


def test_memmap_and_tensor_features_give_the_same_rule(tmp_path, small):
    x, preds, _ = small
    mm = np.lib.format.open_memmap(tmp_path / "feats.npy", mode="w+", dtype=np.float32, shape=x.shape)
    mm[:] = x
    mm.flush()
    del mm
    ro = np.load(tmp_path / "feats.npy", mmap_mode="r")
    assert isinstance(ro, np.memmap)
    ref_rule, ref_out = _rule_summary(x, {"predictions": preds})
    assert ref_out["fired_val"] > 0
    for feats in (ro, torch.from_numpy(x.copy())):
        rule, out = _rule_summary(feats, {"predictions": preds})
        np.testing.assert_allclose(rule.weight, ref_rule.weight, rtol=0, atol=1e-6)
        np.testing.assert_allclose(rule.bias, ref_rule.bias, rtol=0, atol=1e-6)
        assert rule.threshold == pytest.approx(ref_rule.threshold, abs=1e-5)
        for key in ("fired_fit", "errors_fit", "fired_val", "errors_val"):
            assert out[key] == ref_out[key], key
        np.testing.assert_array_equal(rule.fires(x), ref_rule.fires(x))


def test_score_matrix_column_works_like_the_index_column(small):
    x, preds, scores = small
    ref_rule, ref_out = _rule_summary(x, {"predictions": preds})
    for col in (scores, torch.from_numpy(scores)):
        rule, out = _rule_summary(x, {"scores": col}, column="scores")
        assert rule.class_ == 2 and out["column"] == "scores"
        np.testing.assert_array_equal(rule.weight, ref_rule.weight)
        assert rule.threshold == ref_rule.threshold
        for key in ("fired_fit", "errors_fit", "fired_val", "errors_val"):
            assert out[key] == ref_out[key], key


def test_score_matrix_keeps_classes_that_are_never_top(small):
    x, _, scores = small
    padded = np.concatenate([scores, np.full((len(scores), 2), -1e6, np.float32)], axis=1)  # K+2 columns
    ae = AnalyticsEngine(x, {"scores": padded}, epochs=1, progress=False)
    rules, _ = ae.compute_linear_sufficient_rules("scores", max_error=0.05)
    assert rules.num_classes == K + 2  # the model's output width, for BranchedNetwork
    assert rules.rule_classes == tuple(range(K))
    with pytest.raises(MocoError, match=f"scores == {K + 1}"):
        ae.compute_linear_sufficient_rule("scores", K + 1)


def test_several_columns_in_one_engine(small):
    x, preds, _ = small
    # a second column: the classifier's prediction with class 3 merged into class 0
    merged = np.where(preds == 3, 0, preds)
    ae = AnalyticsEngine(x, {"predictions": preds, "merged": merged}, epochs=3, progress=False)
    r1, _ = ae.compute_linear_sufficient_rule("predictions", 3, max_error=0.05)
    r2, o2 = ae.compute_linear_sufficient_rule("merged", 0, max_error=0.05)
    assert r1.classes == (0, 1, 2, 3) and r2.classes == (0, 1, 2)
    assert o2["column"] == "merged"


# ---------------------------------------------------------------------------- threshold selection


def test_select_threshold_clean_data_fires_on_the_clean_part():
    rng = np.random.default_rng(0)
    val = rng.uniform(size=4000)
    fit = rng.uniform(size=4000)
    wrong = val < 0.3  # everything below 0.3 is a wrong exit, nothing above
    ch = select_threshold(val, wrong, fit, max_error=0.01)
    assert isinstance(ch, ThresholdChoice) and ch.certified
    assert ch.fired == int((val > ch.threshold).sum()) > 2000  # about all of the clean 70 %
    assert ch.errors == int((wrong & (val > ch.threshold)).sum())
    assert ch.errors / ch.fired <= ch.error_bound <= 0.01
    assert ch.threshold > 0.25  # it may dip slightly into the wrong part, never far


def test_select_threshold_all_wrong_never_fires():
    rng = np.random.default_rng(1)
    val, fit = rng.normal(size=2000), rng.normal(size=2000)
    ch = select_threshold(val, np.ones(2000, bool), fit, max_error=0.05)
    assert ch.threshold == math.inf and ch.fired == 0 and not ch.certified


def test_select_threshold_guarantee_holds_over_repeated_draws():
    """With probability >= confidence the chosen threshold's *true* error among fired is <= max_error.

    Scores ~ U(0, 1) and P(wrong | s) = 0.06 (1 - s)^2: the true error rate among s > t is 0.02 (1 - t)^2,
    <= max_error = 0.01 exactly for t >= 1 - 0.5 ** 0.5. Thresholds land close to that edge, so the
    violation rate (about 5 % here) is near the allowed 1 - confidence = 10 %.
    """
    rng = np.random.default_rng(2)
    max_error, confidence, trials, n = 0.01, 0.9, 300, 3000
    violations = certified = 0
    for _ in range(trials):
        val, fit = rng.uniform(size=n), rng.uniform(size=n)
        wrong = rng.uniform(size=n) < 0.06 * (1 - val) ** 2
        ch = select_threshold(val, wrong, fit, max_error=max_error, confidence=confidence, grid=50)
        if ch.certified:
            certified += 1
            violations += 0.02 * (1 - ch.threshold) ** 2 > max_error
    assert certified > 0.8 * trials
    assert violations / trials <= (1 - confidence) + 0.04
