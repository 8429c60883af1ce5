"""moco.compress.surgery: physically smaller models with every dependent layer adjusted, save/load, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from moco.compress.surgery import SurgeryError, apply, dependency_groups, load, save
from moco.errors import MocoError
from moco.models import create

X28 = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def _seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and non-trivial BatchNorm statistics, so that slicing mistakes change outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def vgg() -> nn.Sequential:
    """VGG-style: two Conv-BN-ReLU-MaxPool blocks, flatten -> Linear."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 7 * 7, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10),
    )


class CatNet(nn.Module):
    """Two branches concatenated along channels, then added to a third conv (ties across the cat)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.b = nn.Conv2d(1, 6, 3, padding=1)
        self.d = nn.Conv2d(1, 10, 3, padding=1)
        self.c = nn.Conv2d(10, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        y = torch.cat([torch.relu(self.a(x)), self.b(x)], dim=1) + self.d(x)
        y = torch.relu(self.bn(self.c(y)))
        return self.fc(y.mean((2, 3)))


class CatOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3)
        self.b = nn.Conv2d(1, 6, 3)
        self.c = nn.Conv2d(10, 5, 3)
        self.fc = nn.Linear(5 * 24 * 24, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.c(torch.cat([self.a(x), self.b(x)], 1)), 1))


MODELS = {
    "seed_cnn": lambda: create("seed_cnn"),
    "fashion_cnn": lambda: create("fashion_cnn"),
    "lenet5": lambda: create("lenet5"),
    "resnet18": lambda: create("resnet18", width_multiplier=0.25, in_channels=1),
    "mobilenet_v1": lambda: create("mobilenet_v1", width_multiplier=0.25, in_channels=1),
    "vgg": vgg,
    "catnet": CatNet,
}


def _halve(model: nn.Module) -> dict[str, list[int]]:
    """Keep every other unit of every prunable group (naming its first layer)."""
    keep = {}
    for group in dependency_groups(model, X28):
        if group.prunable:
            keep[group.layers[0]] = list(range(0, group.units, 2))
    return keep


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(MODELS))
def test_identity_when_every_unit_kept_and_shapes_after_pruning(name):
    torch.manual_seed(0)
    model = _seeded(MODELS[name]())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = model(X28)
    full = {n: range(p) for n, p in [(g.layers[0], g.units) for g in dependency_groups(model, X28) if g.prunable]}
    same = apply(model, full, X28)
    assert same is not model
    torch.testing.assert_close(same(X28), reference, atol=1e-5, rtol=1e-5)
    small = apply(model, _halve(model), X28)
    out = small(X28)
    assert out.shape == reference.shape and torch.isfinite(out).all()
    assert _n_params(small) < _n_params(model)
    for key, value in model.state_dict().items():  # the original is untouched
        assert torch.equal(value, before[key]), key
    assert not small.training


def test_param_count_by_hand_and_kept_channels_compute_the_same():
    model = _seeded(create("fashion_cnn"))  # conv 1->16 (3x3), conv 16->16, 16*24*24 -> 100 -> 10
    small = apply(model, {"0": [1, 4, 6, 9, 12, 13, 14, 15], "2": [0, 3, 7, 8], "5": range(50)}, X28)
    expected = (8 * 1 * 9 + 8) + (4 * 8 * 9 + 4) + (4 * 24 * 24 * 50 + 50) + (50 * 10 + 10)
    assert _n_params(small) == expected
    assert small[0].out_channels == 8 and small[2].in_channels == 8 and small[5].in_features == 4 * 576
    # a pruned conv fed by an unpruned layer computes exactly the original's selected channels
    keep = np.array([2, 5, 11])
    small = apply(model, {"2": keep}, X28)
    hidden = model[1](model[0](X28))
    torch.testing.assert_close(small[2](hidden), model[2](hidden)[:, keep], atol=0, rtol=0)
    # ... and the model equals the original with the dropped channels' Linear columns zeroed
    masked = _zero_inputs(model, {"5": np.setdiff1d(np.arange(16), keep)}, spatial=24 * 24)
    torch.testing.assert_close(small(X28), masked(X28), atol=1e-5, rtol=1e-5)


def _zero_inputs(model: nn.Module, removed: dict[str, np.ndarray], spatial: int = 1) -> nn.Module:
    """A copy of ``model`` where the named layers ignore the removed input channels (or feature groups)."""
    import copy

    masked = copy.deepcopy(model)
    with torch.no_grad():
        for name, channels in removed.items():
            layer = masked.get_submodule(name)
            cols = np.concatenate([np.arange(c * spatial, (c + 1) * spatial) for c in channels])
            layer.weight[:, torch.from_numpy(cols)] = 0
    return masked


def test_vgg_bn_flatten_linear_equals_masked_original():
    model = _seeded(vgg())
    k0, k4 = [0, 2, 3, 7], [1, 2, 5, 6, 9, 10, 15]
    small = apply(model, {"0": k0, "4": k4}, X28)
    assert (small[0].out_channels, small[1].num_features, small[4].in_channels) == (4, 4, 4)
    assert (small[5].num_features, small[9].in_features) == (7, 7 * 49)
    torch.testing.assert_close(small[1].running_mean, model[1].running_mean[k0])
    # pruning only the second block: equals the original whose Linear ignores the dropped channels
    small = apply(model, {"4": k4}, X28)
    masked = _zero_inputs(model, {"9": np.setdiff1d(np.arange(16), k4)}, spatial=49)
    torch.testing.assert_close(small(X28), masked(X28), atol=1e-5, rtol=1e-5)


def test_lenet_batchnorm1d_after_bias_free_linear():
    model = _seeded(create("lenet5"))
    keep = np.arange(0, 120, 3)
    small = apply(model, {"fc1.0": keep}, X28)
    assert (small.fc1[0].out_features, small.fc1[1].num_features, small.fc2[0].in_features) == (40, 40, 40)
    torch.testing.assert_close(small.fc1[1].running_var, model.fc1[1].running_var[keep])
    masked = _zero_inputs(model, {"fc2.0": np.setdiff1d(np.arange(120), keep)})
    torch.testing.assert_close(small(X28), masked(X28), atol=1e-5, rtol=1e-5)


def test_resnet_residual_group_and_projection_shortcut():
    model = _seeded(create("resnet18", width_multiplier=0.25, in_channels=1))
    groups = {g.layers[0]: g for g in dependency_groups(model, X28)}
    assert groups["stem.0"].layers == ("stem.0", "layer1.0.conv2", "layer1.1.conv2")
    assert groups["layer2.0.conv2"].layers == ("layer2.0.conv2", "layer2.0.shortcut.0", "layer2.1.conv2")
    assert not groups["fc"].prunable and groups["stem.0"].prunable
    keep = [0, 1, 4, 9, 15]
    small = apply(model, {"layer1.1.conv2": keep}, X28)  # one member decides for the whole group
    for name in ("stem.0", "layer1.0.conv2", "layer1.1.conv2"):
        assert small.get_submodule(name).out_channels == 5
    for name in ("layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.shortcut.0"):
        assert small.get_submodule(name).in_channels == 5
    dropped = np.setdiff1d(np.arange(16), keep)
    masked = _zero_inputs(
        model, {n: dropped for n in ("layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.shortcut.0")}
    )
    torch.testing.assert_close(small(X28), masked(X28), atol=1e-5, rtol=1e-5)
    # the same indices for two members is fine; different ones are a conflict naming the add
    apply(model, {"stem.0": keep, "layer1.0.conv2": np.array(keep)}, X28)
    with pytest.raises(SurgeryError, match=r"conflicting keep sets.*add"):
        apply(model, {"stem.0": keep, "layer1.0.conv2": [0, 1, 2]}, X28)


def test_train_mode_model_is_not_touched_and_flag_is_kept():
    model = create("resnet18", width_multiplier=0.25, in_channels=1).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = apply(model, {"layer3.0.conv1": torch.arange(0, 64, 3)}, X28)
    assert small.training and model.training
    for key, value in model.state_dict().items():  # BN running stats unchanged by tracing
        assert torch.equal(value, before[key]), key


def test_mobilenet_depthwise_follows_its_input():
    model = _seeded(create("mobilenet_v1", width_multiplier=0.25, in_channels=1))
    keep = [0, 2, 3, 5]
    small = apply(model, {"stem.0": keep}, X28)
    dw = small.features[0].depthwise[0]
    assert (dw.in_channels, dw.out_channels, dw.groups) == (4, 4, 4)
    assert small.features[0].pointwise[0].in_channels == 4
    torch.testing.assert_close(dw.weight, model.features[0].depthwise[0].weight[keep])
    masked = _zero_inputs(model, {"features.0.pointwise.0": np.setdiff1d(np.arange(8), keep)})
    torch.testing.assert_close(small(X28), masked(X28), atol=1e-5, rtol=1e-5)


def test_cat_offsets_and_ties_across_cat_plus_add():
    model = _seeded(CatOnly())
    small = apply(model, {"a": [1, 3], "b": [0, 4, 5]}, X28)
    assert small.c.in_channels == 5 and small.fc.in_features == 5 * 576
    masked = _zero_inputs(model, {"c": np.array([0, 2, 5, 6, 7])})
    torch.testing.assert_close(small(X28), masked(X28), atol=1e-5, rtol=1e-5)

    net = _seeded(CatNet())
    (group,) = [g for g in dependency_groups(net, X28) if "d" in g.layers]
    assert group.layers[0] == "d" and set(group.layers) == {"a", "b", "d"} and group.units == 10
    small = apply(net, {"d": [0, 1, 5, 9]}, X28)  # d's unit i is a's unit i (i < 4), else b's unit i - 4
    assert (small.a.out_channels, small.b.out_channels, small.d.out_channels, small.c.in_channels) == (2, 2, 4, 4)
    masked = _zero_inputs(net, {"c": np.array([2, 3, 4, 6, 7, 8])})
    torch.testing.assert_close(small(X28), masked(X28), atol=1e-5, rtol=1e-5)


def test_grouped_conv_keeps_whole_groups():
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 24 * 24, 4)).eval()
    small = apply(model, {"0": [4, 5, 6, 7]}, X28)
    assert (small[2].in_channels, small[2].out_channels, small[2].groups) == (4, 4, 1)
    masked = _zero_inputs(model, {"5": np.arange(4)}, spatial=24 * 24)
    torch.testing.assert_close(small(X28), masked(X28), atol=1e-5, rtol=1e-5)
    with pytest.raises(SurgeryError, match=r"grouped conv '2' \(groups=2.*whole groups"):
        apply(model, {"0": [0, 1, 2]}, X28)


def test_save_load_round_trip(tmp_path):
    seq = _seeded(create("seed_cnn"))
    small = apply(seq, {"0": [0, 3, 5], "2": range(0, 64, 2)}, X28)
    json_path = save(small, tmp_path / "seq")
    assert json_path == tmp_path / "seq.json" and (tmp_path / "seq.pt").is_file()
    again = load(tmp_path / "seq")  # a plain Sequential is described entirely: no base needed
    assert torch.equal(again(X28), small(X28)) and not again.training

    net = _seeded(create("resnet18", width_multiplier=0.25, in_channels=1))
    small = apply(net, {"stem.0": range(6), "layer4.0.conv1": [1, 2, 3]}, X28)
    arch = {"name": "resnet18", "kwargs": {"width_multiplier": 0.25, "in_channels": 1}}
    save(small, tmp_path / "res.json", arch=arch)
    assert torch.equal(load(tmp_path / "res.pt")(X28), small(X28))

    cat = _seeded(CatNet())
    small = apply(cat, {"d": [0, 5]}, X28)
    save(small, tmp_path / "cat")
    with pytest.raises(SurgeryError, match="pass base="):
        load(tmp_path / "cat")
    before = {k: v.clone() for k, v in cat.state_dict().items()}
    assert torch.equal(load(tmp_path / "cat", base=cat)(X28), small(X28))
    assert all(torch.equal(v, before[k]) for k, v in cat.state_dict().items())
    # the weights file is a plain tensor dict: loadable with weights_only=True
    state = torch.load(tmp_path / "cat.pt", weights_only=True)
    assert state["d.weight"].shape == (2, 1, 3, 3)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 26 * 26, 2)

    def forward(self, x):
        x = self.conv(x)
        if x.sum() > 0:  # data-dependent control flow
            x = x * 2
        return self.fc(x.flatten(1))


class HardCodedView(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.conv2 = nn.Conv2d(4, 4, 3)
        self.fc = nn.Linear(4 * 24 * 24, 2)

    def forward(self, x):
        return self.fc(self.conv2(self.conv(x)).view(-1, 4 * 24 * 24))


class Permuted(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.conv(x).permute(0, 2, 3, 1)).mean((1, 2))


class BatchPermuted(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.conv(x).permute(1, 0, 2, 3).mean((2, 3)).t())


def test_errors_name_the_problem():
    model = create("fashion_cnn").eval()
    with pytest.raises(SurgeryError, match=r"no layer 'conv9'.*layers with units"):
        apply(model, {"conv9": [0]}, X28)
    with pytest.raises(SurgeryError, match=r"layer '1' is a ReLU"):
        apply(model, {"1": [0]}, X28)
    with pytest.raises(SurgeryError, match=r"index 16 out of range.*16 units"):
        apply(model, {"0": [0, 16]}, X28)
    with pytest.raises(SurgeryError, match=r"index -1 out of range"):
        apply(model, {"0": [-1, 2]}, X28)
    with pytest.raises(SurgeryError, match=r"lists unit 3 more than once"):
        apply(model, {"0": [3, 1, 3]}, X28)
    with pytest.raises(SurgeryError, match=r"keep\['2'\] is empty"):
        apply(model, {"2": []}, X28)
    with pytest.raises(SurgeryError, match=r"cannot remove unit 0 of layer '7' \(nor the units tied to it\): they are the model output"):
        apply(model, {"7": range(1, 10)}, X28)
    with pytest.raises(TypeError, match="boolean mask"):
        apply(model, {"0": np.ones(16, dtype=bool)}, X28)
    with pytest.raises(TypeError, match="example_input"):
        apply(model, {}, "not a tensor")
    with pytest.raises(SurgeryError, match=r"example_input of shape \(1, 3, 32, 32\) does not run"):
        apply(model, {}, torch.randn(1, 3, 32, 32))
    with pytest.raises(SurgeryError, match=r"cannot trace Untraceable"):
        apply(Untraceable(), {"conv": [0]}, X28)
    with pytest.raises(SurgeryError, match=r"view\(\) \(node 'view'\) with the hard-coded size 2304, which surgery"):
        apply(HardCodedView(), {"conv2": [0, 1]}, X28)
    apply(HardCodedView(), {"conv": [0, 1]}, X28)  # the view only sees conv2's channels: fine
    # a channels-last permute is followed (the Linear reads the channels); one that moves the batch dim is not
    assert apply(Permuted(), {"conv": [0, 1]}, X28).fc.in_features == 2
    with pytest.raises(SurgeryError, match=r"\.permute\(\) \(node 'permute'\) that moves the batch dim, which surgery"):
        apply(BatchPermuted(), {"conv": [0, 1]}, X28)
    assert issubclass(SurgeryError, MocoError) and issubclass(SurgeryError, ValueError)
    groups = {g.layers: g for g in dependency_groups(BatchPermuted(), X28)}
    assert not groups[("conv",)].prunable and "permute" in groups[("conv",)].reason


def _tampered(tmp_path, edit):
    """Save a small pruned vgg with a zoo-free tree, apply ``edit(desc_dict, pt_path)``, return the stem."""
    import json

    small = apply(_seeded(vgg()), {"0": [0, 2, 4]}, X28)
    save(small, tmp_path / "m")
    jpath = tmp_path / "m.json"
    desc = json.loads(jpath.read_text())
    edit(desc, tmp_path / "m.pt")
    jpath.write_text(json.dumps(desc))
    return tmp_path / "m"


@pytest.mark.parametrize("edit,match", [
    (lambda d, pt: d.pop("weights"), r"m\.json is damaged: key 'weights'"),
    (lambda d, pt: d.update(weights=7), r"key 'weights'.*not a string"),
    (lambda d, pt: d.update(modules=[1, 2]), r"'modules' must be a dict"),
    (lambda d, pt: d["modules"].update({"0": "Conv2d"}), r"module entry '0' must be"),
    (lambda d, pt: d.update(arch=["resnet18"]), r"'arch' must be \{'name': str"),
    (lambda d, pt: d.update(arch={"kwargs": {}}), r"'arch' must be \{'name': str"),
    (lambda d, pt: d.update(arch={"name": "resnet18", "kwargs": {"bogus": 1}}), r"arch .* does not build"),
    (lambda d, pt: d["tree"]["children"][0].pop("name"), r"'tree' is malformed"),
    (lambda d, pt: d["modules"]["0"]["kwargs"].update(out_channels=-3), r"module '0'"),
    (lambda d, pt: d.update(training="yes"), r"'training' must be true or false"),
    (lambda d, pt: pt.write_bytes(pt.read_bytes()[: len(pt.read_bytes()) // 2]), r"cannot read weights .*m\.pt.*re-save"),
    (lambda d, pt: pt.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))),
     r"cannot read weights .*m\.pt.*re-save"),
    (lambda d, pt: torch.save([torch.zeros(2)], pt), r"does not hold a state_dict of tensors"),
    (lambda d, pt: torch.save({"0.weight": torch.zeros(2)}, pt), r"do not fit the rebuilt model"),
])
def test_load_tampered_files_raise_clear_errors(tmp_path, edit, match):
    stem = _tampered(tmp_path, edit)
    with pytest.raises(SurgeryError, match=match):
        load(stem)


def test_a_users_file_model_rebuilds_from_its_recorded_spec(tmp_path, monkeypatch):
    # moco imports a user's file under its own module name (moco_user_<file>_<hash>); the saved JSON names
    # the spec, so load needs no base, and a base the user imported themselves passes the class check
    import importlib.util
    import shutil

    src = Path(__file__).resolve().parents[1] / "examples" / "mynet.py"
    shutil.copy(src, tmp_path / "mynet.py")
    from moco.specs import absolute_spec, resolve_model

    monkeypatch.chdir(tmp_path)
    spec = {"model": absolute_spec("mynet.py:Net"), "args": {"width": 8}}
    assert spec["model"] == f"{(tmp_path / 'mynet.py').resolve()}:Net"
    net = _seeded(resolve_model("mynet.py:Net", args={"width": 8}, require_weights=False).model)
    assert type(net).__module__.startswith("moco_user_")
    small = apply(net, {"stem": [0, 2, 3, 5, 7]}, X28)
    assert small.stem.out_channels == 5
    save(small, tmp_path / "out" / "small", spec=spec)
    monkeypatch.chdir(tmp_path / "out")
    assert torch.equal(load(tmp_path / "out" / "small")(X28), small(X28))
    mod_spec = importlib.util.spec_from_file_location("mynet", tmp_path / "mynet.py")
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    assert torch.equal(load(tmp_path / "out" / "small", base=mod.Net(width=8))(X28), small(X28))
    with pytest.raises(SurgeryError, match="holds a .*Net, but base is a"):
        load(tmp_path / "out" / "small", base=CatNet())
    (tmp_path / "mynet.py").unlink()
    with pytest.raises(SurgeryError, match="does not build here.*pass base="):
        load(tmp_path / "out" / "small")
    with pytest.raises(TypeError, match="spec must be"):
        save(small, tmp_path / "bad", spec={"args": {}})


class _SharedConv(nn.Module):
    """One conv applied twice (weight sharing): its input channels are a's outputs and its own."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 6, 3, padding=1)
        self.shared = nn.Conv2d(6, 6, 3, padding=1)
        self.c = nn.Conv2d(6, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.relu(self.shared(torch.relu(self.shared(torch.relu(self.a(x))))))
        return self.fc(torch.relu(self.c(x)).mean((2, 3)))


class _PoolIndices(nn.Module):
    """Max pooling with return_indices=True, the indices unpooled again (module and functional forms)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2)
        self.c2 = nn.Conv2d(6, 5, 3, padding=1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        h, idx = self.pool(torch.relu(self.c1(x)))
        h = self.unpool(h, idx)
        h, _ = torch.nn.functional.max_pool2d(torch.relu(self.c2(h)), 2, return_indices=True)
        return self.fc(h.mean((2, 3)))


def test_a_module_called_twice_ties_its_inputs():
    # the shared conv's input channels are a's outputs in one call and its own in the other: one group; the
    # pruner chose different sets for 'a' and 'shared' and surgery refused them
    from moco.compress.prune import masked_copy, select_one_shot

    model = _seeded(_SharedConv()).eval()
    groups = dependency_groups(model, X28)
    assert [(g.layers, g.prunable) for g in groups] == [(("a", "shared"), True), (("c",), True), (("fc",), False)]
    keep = select_one_shot(model, 0.5, example_input=X28)
    assert keep["a"] == keep["shared"] and len(keep["a"]) == 3
    small = apply(model, keep, X28)
    assert small.shared.in_channels == small.shared.out_channels == 3
    with torch.no_grad():
        torch.testing.assert_close(small(X28), masked_copy(model, keep)(X28), atol=1e-5, rtol=1e-5)


def test_max_pooling_with_indices_keeps_the_channels_prunable():
    # (values, indices) was read as "changes the channel count": every conv before such a pool was pinned
    model = _seeded(_PoolIndices()).eval()
    groups = dependency_groups(model, X28)
    assert [(g.layers, g.prunable) for g in groups] == [(("c1",), True), (("c2",), True), (("fc",), False)]
    small = apply(model, {"c1": [0, 2, 5], "c2": [1, 3]}, X28)
    assert small.c2.in_channels == 3 and small.fc.in_features == 2
    from moco.compress.prune import masked_copy

    with torch.no_grad():
        torch.testing.assert_close(small(X28), masked_copy(model, {"c1": [0, 2, 5], "c2": [1, 3]})(X28),
                                   atol=1e-5, rtol=1e-5)


class _TokenMixer(nn.Module):
    """Patch tokens [N, T, C], a class token (a parameter), attention, then a Linear-GELU-Linear MLP."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(1, 8, 7, 7)
        self.cls = nn.Parameter(torch.zeros(1, 1, 8))
        self.ln = nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1)
        h = self.ln(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.mlp(self.ln(x))
        return self.fc(x[:, 0])


def test_a_transformer_mlp_stays_prunable_behind_attention_and_a_class_token():
    # the opaque attention and class-token cat gave their outputs channels in dim 1 (the tokens), so the MLP's
    # Linears dropped out of the groups: "no prunable layer (every unit is tied to the output or input)"
    from moco.compress.prune import masked_copy, select_one_shot

    model = _seeded(_TokenMixer()).eval()
    groups = {g.layers: g for g in dependency_groups(model, X28)}
    # the hidden units of the MLP are its own; the residual stream is pinned by the class token, with that reason
    assert [(layers, g.prunable) for layers, g in groups.items()] == [
        (("patch",), False), (("mlp.0",), True), (("mlp.2",), False), (("fc",), False)]
    assert "class token" in groups[("patch",)].reason
    keep = select_one_shot(model, 0.5, example_input=X28)
    assert list(keep) == ["mlp.0"] and len(keep["mlp.0"]) == 8
    small = apply(model, keep, X28)
    with torch.no_grad():
        torch.testing.assert_close(small(X28), masked_copy(model, keep)(X28), atol=1e-5, rtol=1e-5)
