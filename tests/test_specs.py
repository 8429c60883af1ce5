"""Model and data specs: every form resolves, and every bad one names the spec and the fix."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

from moco.errors import MocoError
from moco.specs import load_weights, parse_data_spec, resolve_data, resolve_model

NET = """
import torch.nn.functional as F
from torch import nn

class Net(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, 3)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))

def make_net(width=4):
    return Net(width)

not_a_model = 3
"""


@pytest.fixture()
def user(tmp_path):
    (tmp_path / "net.py").write_text(NET)
    from importlib.util import module_from_spec, spec_from_file_location

    s = spec_from_file_location("net_t", tmp_path / "net.py")
    mod = module_from_spec(s)
    s.loader.exec_module(mod)
    torch.manual_seed(0)
    model = mod.Net(width=6)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    return tmp_path, model


def test_file_spec_with_weights_rebuilds_the_same_model(user):
    folder, model = user
    r = resolve_model("net.py:Net", weights="w.pt", args={"width": 6}, base_dir=folder)
    x = torch.randn(2, 1, 8, 8)
    model.eval()
    assert torch.equal(r.model(x), model(x))
    assert r.label == "net.py:Net" and r.weights == str(folder / "w.pt")
    r2 = resolve_model("net.py:make_net", weights="w.pt", args={"width": 6}, base_dir=folder)
    assert torch.equal(r2.model(x), model(x))


def test_importable_spec_and_class_path(user, monkeypatch):
    folder, model = user
    monkeypatch.syspath_prepend(str(folder))
    r = resolve_model("net:Net", weights=folder / "w.pt", args={"width": 6})
    r2 = resolve_model("net.Net", weights=folder / "w.pt", args={"width": 6})  # LightningCLI class_path
    x = torch.randn(1, 1, 8, 8)
    assert torch.equal(r.model(x), r2.model(x))


def test_lightning_style_checkpoint_with_prefix(user):
    folder, model = user
    state = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "epoch": 3,
             "pytorch-lightning_version": "2.5.0"}
    torch.save(state, folder / "lit.ckpt")
    r = resolve_model("net.py:Net", weights="lit.ckpt", args={"width": 6}, base_dir=folder)
    x = torch.randn(1, 1, 8, 8)
    assert torch.equal(r.model(x), model.eval()(x))


@pytest.mark.parametrize("spec, args, needle", [
    ("net.py:Nope", {}, "has no 'Nope'"),
    ("net.py:not_a_model", {}, "not a class or function"),
    ("missing.py:Net", {}, "not found"),
    ("net.py:Net", {"depth": 3}, "arguments .* do not fit"),
    ("no_such_pkg_xyz.mod:Net", {}, "cannot import module"),
    ("vgg99", {}, "neither a zoo model"),
    ("", {}, "non-empty string"),
])
def test_bad_model_specs(user, spec, args, needle):
    folder, _ = user
    with pytest.raises(MocoError, match=needle):
        resolve_model(spec, weights="w.pt", args=args, base_dir=folder)


def test_bad_weights_files(user):
    folder, _ = user
    (folder / "trunc.pt").write_bytes((folder / "w.pt").read_bytes()[:100])
    (folder / "random.pt").write_bytes(os.urandom(512))
    torch.save({"a": 1}, folder / "nodict.pt")
    torch.save({"conv.weight": torch.zeros(1)}, folder / "wrong.pt")
    for name, needle in [("trunc.pt", "truncated or was not written by torch.save"),
                         ("random.pt", "truncated or was not written by torch.save"),
                         ("nodict.pt", "holds no state_dict"), ("wrong.pt", "do not fit the model"),
                         ("absent.pt", "not found")]:
        with pytest.raises(MocoError, match=needle) as info:
            resolve_model("net.py:Net", weights=name, args={"width": 6}, base_dir=folder)
        assert name in str(info.value)
    with pytest.raises(MocoError, match="has no weights"):
        resolve_model("net.py:Net", base_dir=folder)


def test_weights_are_never_unpickled(user, tmp_path):
    folder, model = user

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > /dev/null",))

    torch.save({"state_dict": model.state_dict(), "evil": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(MocoError, match="objects other than tensors"):
        load_weights(model, tmp_path / "evil.pt")


def test_data_specs_parse():
    assert parse_data_spec("fashion_mnist:test") == ("fashion_mnist", "test")
    assert parse_data_spec("digits") == ("digits", None)
    assert parse_data_spec("data/x.npz") == ("data/x.npz", None)


def test_npz_data_uint8_float_and_3d(tmp_path):
    x8 = np.random.default_rng(0).integers(0, 256, (10, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", x=x8, y=np.arange(10) % 3)
    d = resolve_data(str(tmp_path / "a.npz"))
    assert d.x.shape == (10, 1, 8, 8) and d.x.dtype == torch.float32
    assert torch.allclose(d.x[:, 0], torch.from_numpy(x8).float() / 255)  # [0, 1] and nothing else
    assert d.classes == ("0", "1", "2") and d.y.dtype == torch.int64
    d2 = resolve_data(str(tmp_path / "a.npz"), normalize=[0.5, 0.25])
    assert torch.allclose(d2.x, (d.x - 0.5) / 0.25)
    xf = np.random.default_rng(0).normal(size=(4, 3, 5, 5)).astype(np.float32)
    np.savez(tmp_path / "f.npz", x=xf, y=np.array([0, 1, 1, 0]), classes=np.array(["cat", "dog"]))
    d3 = resolve_data(str(tmp_path / "f.npz"))
    assert torch.equal(d3.x, torch.from_numpy(xf)) and d3.classes == ("cat", "dog")


@pytest.mark.parametrize("arrays, needle", [
    ({"images": np.zeros((2, 4, 4))}, "must hold arrays 'x'"),
    ({"x": np.zeros((2, 4, 4)), "y": np.array([0.5, 1])}, "integer class indices"),
    ({"x": np.zeros((2, 4, 4)), "y": np.array([0, 1, 2])}, r"shape \(2,\)"),
    ({"x": np.full((2, 4, 4), np.nan, np.float32), "y": np.array([0, 1])}, "NaN"),
    ({"x": np.zeros((2, 4), np.float32), "y": np.array([0, 1])}, r"\(N, C, H, W\)"),
    ({"x": np.zeros((2, 4, 4), np.int32), "y": np.array([0, 1])}, "float or uint8"),
    ({"x": np.zeros((2, 4, 4), np.float32), "y": np.array([0, -1])}, "negative labels"),
    ({"x": np.zeros((2, 8, 8, 3), np.uint8), "y": np.array([0, 1])}, r"channels last.*transpose\(0, 3, 1, 2\)"),
])
def test_bad_npz(tmp_path, arrays, needle):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(MocoError, match=needle):
        resolve_data(str(tmp_path / "bad.npz"))


def test_truncated_npz_and_unknown_specs(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.zeros((3, 4, 4), np.uint8), y=np.zeros(3, int))
    (tmp_path / "t.npz").write_bytes((tmp_path / "a.npz").read_bytes()[:50])
    with pytest.raises(MocoError, match="not a readable .npz"):
        resolve_data(str(tmp_path / "t.npz"))
    with pytest.raises(MocoError, match="is not a dataset"):
        resolve_data("imagenet")
    with pytest.raises(MocoError, match="normalize = true needs a named dataset"):
        resolve_data(str(tmp_path / "a.npz"), normalize=True)
    with pytest.raises(MocoError, match="not found"):
        resolve_data(str(tmp_path / "nope.npz"))


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("ant", "bee"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    d = resolve_data(str(tmp_path / "imgs"))
    assert d.x.shape == (6, 1, 6, 6) and d.classes == ("ant", "bee") and d.y.tolist() == [0, 0, 0, 1, 1, 1]
    assert float(d.x.max()) <= 1.0
    Image.fromarray(rng.integers(0, 256, (7, 7, 3), dtype=np.uint8)).save(tmp_path / "imgs" / "bee" / "big.png")
    with pytest.raises(MocoError, match="different sizes"):
        resolve_data(str(tmp_path / "imgs"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MocoError, match="no class sub-folders"):
        resolve_data(str(tmp_path / "empty"))


def test_named_dataset_scaling_only_unless_asked():
    d = resolve_data("digits:test")
    assert float(d.x.min()) >= 0.0 and float(d.x.max()) <= 1.0 and d.normalize is None
    dn = resolve_data("digits:test", normalize=True)
    assert dn.normalize is not None and float(dn.x.mean()) == pytest.approx(0.0, abs=0.2)


def test_align_classes_maps_test_labels_by_name_or_refuses():
    from moco.specs import Data, align_classes

    x = torch.zeros(3, 1, 2, 2)
    train = Data(x, torch.tensor([0, 1, 2]), ("airplane", "automobile", "bird"), "tr", "tr")
    # a test folder without 'airplane' numbers 'automobile' 0: mapped back onto the train numbering
    test = Data(x, torch.tensor([0, 1, 1]), ("automobile", "bird"), "te", "te")
    got = align_classes(train, test)
    assert got.y.tolist() == [1, 2, 2] and got.classes == train.classes
    assert align_classes(train, train) is train
    numeric = Data(x, torch.tensor([0, 1, 2]), ("0", "1", "2"), "n", "n")  # an .npz without names: as it is
    assert align_classes(train, numeric).y.tolist() == [0, 1, 2]
    with pytest.raises(MocoError, match=r"test classes \['cat'\] are not among the train classes"):
        align_classes(train, Data(x, torch.tensor([0, 0, 0]), ("cat",), "o", "o"))
