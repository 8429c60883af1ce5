"""Seed 000's own snippets run as written (adapted only in data size).

Analytics step: capture layer 2 of the seed CNN with ``build_embeddings_and_predictions``, save the
arrays, flatten, ``AnalyticsEngine(array_flattened, {'predictions': preds})`` and one
``compute_linear_sufficient_rule`` per class, pickling ``rule.metadata``. Then the BranchedNetwork
evaluation loop: ``p_new, mask = new_model(x)``, ``mask.sum()``, ``torch.vstack`` and the argmax
agreement with the original model.

The model has random weights (seeded) and the data is 400 scikit-learn digits, so only a few classes
are predicted and the held-out split is small: classes with too few samples give the clear
"too few held-out samples" error, which the loop records instead of crashing.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from moco.errors import MocoError

N_IMAGES = 400
MAX_ERROR = 0.1  # what 100 held-out samples can certify


class LitCNN(torch.nn.Module):
    """Seed 000's ``m``: a Lightning-style wrapper whose ``.model`` is the ``nn.Sequential`` and whose forward
    is that child's (plus a loss module, as Lightning modules have)."""

    def __init__(self):
        super().__init__()
        from moco.models import create

        self.model = create("seed_cnn")
        self.loss = torch.nn.CrossEntropyLoss()

    def forward(self, x):
        return self.model(x)


@pytest.fixture(scope="module")
def m():
    torch.manual_seed(0)
    return LitCNN().eval()


def test_an_int_layer_on_a_wrapper_that_is_not_its_child_is_refused(data):
    from moco import build_embeddings_and_predictions

    class Softmaxed(LitCNN):
        def forward(self, x):
            return self.model(x).softmax(1)

    with pytest.raises(MocoError, match="an int layer is a split index into an nn.Sequential"):
        build_embeddings_and_predictions(Softmaxed().eval(), data[:10], 2, progress=False)


@pytest.fixture(scope="module")
def data():
    from moco.data import load_digits

    return load_digits(train=True).tensors()[0][:N_IMAGES]


def test_top_level_imports():
    import moco
    from moco import AnalyticsEngine, BranchedNetwork, build_embeddings_and_predictions, build_embeddings_from_predictions
    from moco import load_rule, load_rules

    assert build_embeddings_from_predictions is build_embeddings_and_predictions
    assert AnalyticsEngine is moco.rules.AnalyticsEngine
    assert load_rule is moco.rules.load_rule and load_rules is moco.rules.load_rules
    assert callable(BranchedNetwork)


@pytest.fixture(scope="module")
def analytics(m, data, tmp_path_factory):
    """The seed's analytics snippet, verbatim except for paths, the data size and the classes looped over."""
    tmp = tmp_path_factory.mktemp("seed000")

    from moco import AnalyticsEngine
    import numpy as np
    import pickle as pkl
    from moco import build_embeddings_from_predictions
    from moco import build_embeddings_and_predictions  # the seed calls this name after importing the alias

    array, preds_array = build_embeddings_and_predictions(m, data, 2)

    np.save(tmp / 'train_layer_2_mnist.npy', array)
    np.save(tmp / 'train_preds_mnist.npy', preds_array)
    print("Done saving.")

    array_flattened = array.reshape((array.shape[0], -1))
    preds = preds_array.argmax(axis = 1)
    ae = AnalyticsEngine(array_flattened, {'predictions': preds})
    rules, outs, refused = {}, {}, {}
    for c in range(10):
        if not (preds == c).any():  # the seed's range(10) assumes every class is predicted
            with pytest.raises(MocoError, match=f"no sample has predictions == {c}"):
                ae.compute_linear_sufficient_rule("predictions", c, fit_on_val=True, max_error=MAX_ERROR)
            continue
        try:
            rule, out = ae.compute_linear_sufficient_rule("predictions", c,
            fit_on_val=True, max_error=MAX_ERROR)
        except MocoError as err:  # a rare class: too few held-out samples to certify MAX_ERROR
            refused[c] = str(err)
            continue
        md = rule.metadata
        with open(tmp / f'mnist_rule_{c}.pkl', 'wb') as f:
            pkl.dump(md, f)
        rule.save(tmp / f'mnist_rule_{c}')
        rules[c], outs[c] = rule, out
    assert build_embeddings_from_predictions is build_embeddings_and_predictions
    return dict(tmp=tmp, array=array, preds_array=preds_array, preds=preds, rules=rules, outs=outs, refused=refused)


def test_analytics_snippet_captures_and_saves(analytics, m, data):
    array, preds_array, tmp = analytics["array"], analytics["preds_array"], analytics["tmp"]
    assert array.shape == (N_IMAGES, 32, 26, 26) and array.dtype == np.float32
    assert preds_array.shape == (N_IMAGES, 10)
    np.testing.assert_array_equal(np.load(tmp / "train_layer_2_mnist.npy"), array)
    np.testing.assert_array_equal(np.load(tmp / "train_preds_mnist.npy"), preds_array)
    with torch.no_grad():
        np.testing.assert_allclose(preds_array, m(data).numpy(), rtol=1e-4, atol=1e-4)


def test_analytics_snippet_rules_and_metadata(analytics):
    import pickle as pkl

    rules, outs, refused, preds = analytics["rules"], analytics["outs"], analytics["refused"], analytics["preds"]
    present = set(np.flatnonzero(np.bincount(preds, minlength=10)).tolist())
    assert set(rules) | set(refused) == present and rules
    for c, msg in refused.items():
        assert "too few held-out samples" in msg and "need at least" in msg
    for c, rule in rules.items():
        assert rule.class_ == c and rule.n_features == 32 * 26 * 26
        md = rule.metadata
        assert json.loads(json.dumps(md)) == md
        with open(analytics["tmp"] / f"mnist_rule_{c}.pkl", "rb") as f:
            assert pkl.load(f) == md
        out = outs[c]
        assert {"coverage_fit", "coverage_val", "precision_val", "certified_precision"} <= set(out)
        if out["fired_val"]:
            assert out["certified_precision"] <= out["precision_val"]
            assert out["certified_precision"] >= 1 - MAX_ERROR
    # at least one rule actually fires, so the branched network below has something to shortcut
    assert any(out["fired_val"] > 0 for out in outs.values())


def test_branched_network_snippet(analytics, m, data):
    pytest.importorskip("moco.rules.branched")
    from moco import BranchedNetwork, load_rule

    import pandas as pd

    best = max(analytics["outs"], key=lambda c: analytics["outs"][c]["fired_val"])
    results = {}
    for pred in [best]:
        # Load from moco.AnalyticsEngine, or cached from disk.
        rule = load_rule(analytics["tmp"] / f"mnist_rule_{pred}")
        print(rule.class_, rule.decision_function_)
        new_model = BranchedNetwork(m.model, layer = 2, rule = rule)
        total_experimental_time = 0

        bl_time = 0
        prediction_n = []
        prediction_o = []
        total_shortcutted = 0
        for i in range(0, len(data), 100):
            x = data[i: i + 100].type(torch.FloatTensor)
            start = time.time()
            p_new, mask = new_model(x)
            total_shortcutted += mask.sum()
            prediction_n.append(p_new)
            end = time.time()
            total_experimental_time += end - start

            start = time.time()
            p_old = m.model(x)
            end = time.time()
            bl_time += end - start

            prediction_o.append(p_old)
        end = time.time()
        preds_old = torch.vstack(prediction_o)
        preds_new = torch.vstack(prediction_n)

        matchy = (preds_old.argmax(axis = 1)) == (preds_new.argmax(axis = 1))

        results[pred] = {
            'baseline_time': bl_time,
            'experimental_time': total_experimental_time,
            'n_match' : matchy.float().mean(),
            'total_shortcutted': total_shortcutted
        }

    df = pd.DataFrame.from_dict(results, orient = 'index')
    assert list(df.index) == [best] and set(df.columns) >= {"n_match", "total_shortcutted"}

    # what the numbers mean: exits are exactly the rule's firing set, with the rule's class;
    # everything else is the model's own output
    rule = analytics["rules"][best]
    flat = analytics["array"].reshape(N_IMAGES, -1)
    fired = rule.fires(flat)
    assert int(total_shortcutted) == int(fired.sum()) > 0
    exited = torch.from_numpy(fired)
    assert (preds_new[exited].argmax(1) == best).all()
    torch.testing.assert_close(preds_new[~exited], preds_old[~exited].detach(), rtol=1e-4, atol=1e-4)
    # agreement: only exits where the model disagrees with the rule's class count as mismatches
    model_pred = torch.from_numpy(analytics["preds"])
    expected_match = 1 - (exited & (model_pred != best)).float().mean()
    assert float(results[best]["n_match"]) == pytest.approx(float(expected_match))
    assert float(results[best]["n_match"]) >= 1 - MAX_ERROR


def test_seed_workflow_when_the_top_class_is_never_predicted(analytics, m, data):
    """The seed passes ``preds_array.argmax(axis=1)``: on data where the model never predicts its last
    class(es), the rule must still fit the model's 10-wide output in ``BranchedNetwork``."""
    pytest.importorskip("moco.rules.branched")
    from moco import AnalyticsEngine, BranchedNetwork

    preds = analytics["preds"]
    top = int(preds.max())
    keep = preds != top
    assert keep.sum() > 100 and preds[keep].max() < 9
    array_flattened = analytics["array"][keep].reshape(int(keep.sum()), -1)
    ae = AnalyticsEngine(array_flattened, {"predictions": preds[keep]}, epochs=1, batch_size=32,
                        progress=False)
    c = int(np.bincount(preds[keep]).argmax())
    rule, _ = ae.compute_linear_sufficient_rule("predictions", c, fit_on_val=True, max_error=0.2)
    new_model = BranchedNetwork(m.model, layer=2, rule=rule)
    x = data[:100].type(torch.FloatTensor)
    p_new, mask = new_model(x)
    with torch.no_grad():
        p_old = m.model(x)
    assert p_new.shape == p_old.shape == (100, 10)
    assert (p_new[~mask].argmax(1) == p_old[~mask].argmax(1)).all()
