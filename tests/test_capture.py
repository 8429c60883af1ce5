"""Capture: embeddings + predictions in one pass, processors, streaming to .npy, hooks, errors, memory."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from moco.capture import (
    Flatten,
    SpatialPool,
    build_embeddings_and_predictions,
    build_embeddings_from_predictions,
    capture,
)
from moco.errors import MocoError
from moco.models import create


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return create("resnet18", width_multiplier=0.25, in_channels=1).eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(40, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def _batched(fn, x: torch.Tensor, batch_size: int) -> np.ndarray:
    with torch.inference_mode():
        return torch.cat([fn(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]).numpy()


def _no_global_hooks() -> bool:
    from torch.nn.modules import module as module_mod

    return not module_mod._global_forward_hooks


def _untouched(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_seed_cnn_layer_2_shapes_and_predictions(seed_cnn, x):
    emb, preds = build_embeddings_and_predictions(seed_cnn, x, 2, batch_size=16, progress=False)
    assert isinstance(emb, np.ndarray) and isinstance(preds, np.ndarray)
    assert emb.dtype == np.float32 and preds.dtype == np.float32
    assert emb.shape == (40, 32, 26, 26) and preds.shape == (40, 10)
    np.testing.assert_array_equal(emb, _batched(seed_cnn[:2], x, 16))
    np.testing.assert_array_equal(preds, _batched(seed_cnn, x, 16))
    with torch.inference_mode():
        np.testing.assert_allclose(preds, seed_cnn(x).numpy(), rtol=1e-5, atol=1e-5)
    # What seed 000 does with them next.
    assert emb.reshape((emb.shape[0], -1)).shape == (40, 32 * 26 * 26)
    assert preds.argmax(axis=1).shape == (40,)
    assert _untouched(seed_cnn) and _no_global_hooks()


def test_one_batch_predictions_equal_model_exactly(seed_cnn, x):
    _, preds = build_embeddings_and_predictions(seed_cnn, x, 2, progress=False)
    with torch.inference_mode():
        np.testing.assert_array_equal(preds, seed_cnn(x).numpy())


def test_alias_is_the_same_function():
    assert build_embeddings_from_predictions is build_embeddings_and_predictions


def test_eval_mode_used_and_training_flags_restored(x):
    torch.manual_seed(0)
    model = create("seed_cnn").train()
    model[1].eval()  # a mixed state must come back exactly
    flags = [m.training for m in model.modules()]
    _, preds = build_embeddings_and_predictions(model, x, 2, progress=False)
    assert [m.training for m in model.modules()] == flags
    model.eval()
    with torch.inference_mode():
        np.testing.assert_array_equal(preds, model(x).numpy())  # dropout was off during capture


def test_named_layer_on_resnet(resnet, x):
    emb, preds = build_embeddings_and_predictions(resnet, x, "layer2", batch_size=16, progress=False)
    assert emb.shape == (40, 32, 14, 14)
    np.testing.assert_array_equal(preds, _batched(resnet, x, 16))
    assert _untouched(resnet) and _no_global_hooks()


def test_flatten_processor(seed_cnn, x):
    emb, _ = build_embeddings_and_predictions(seed_cnn, x, 2, batch_size=16, processor=Flatten(), progress=False)
    assert emb.shape == (40, 32 * 26 * 26)
    np.testing.assert_array_equal(emb, _batched(seed_cnn[:2], x, 16).reshape(40, -1))


@pytest.mark.parametrize("kind", ["max", "avg"])
def test_spatial_pool_processor(seed_cnn, x, kind):
    emb, _ = build_embeddings_and_predictions(
        seed_cnn, x, 2, batch_size=16, processor=SpatialPool(kind), progress=False
    )
    full = torch.from_numpy(_batched(seed_cnn[:2], x, 16))
    expected = full.amax(dim=(2, 3)) if kind == "max" else full.mean(dim=(2, 3))
    assert emb.shape == (40, 32)
    np.testing.assert_allclose(emb, expected.numpy(), rtol=1e-6, atol=1e-6)


def test_processor_units():
    t = torch.arange(24.0).reshape(2, 3, 2, 2)
    assert torch.equal(SpatialPool("max")(t), t.amax(dim=(2, 3)))
    assert torch.equal(SpatialPool("avg")(t), t.mean(dim=(2, 3)))
    flat = torch.randn(5, 7)
    assert SpatialPool()(flat) is flat
    assert Flatten()(t).shape == (2, 12)
    with pytest.raises(MocoError, match=r"SpatialPool expects \[B, C, H, W\] or \[B, C\].*\(2, 3, 4\)"):
        SpatialPool()(torch.zeros(2, 3, 4))
    with pytest.raises(MocoError, match="kind must be 'max' or 'avg'"):
        SpatialPool("median")
    with pytest.raises(Exception):  # frozen dataclass
        SpatialPool().kind = "avg"  # type: ignore[misc]
    assert SpatialPool("avg") == SpatialPool("avg") and Flatten() == Flatten()


def test_spatial_pool_on_linear_output_passes_through(seed_cnn, x):
    emb, _ = build_embeddings_and_predictions(seed_cnn, x, 8, processor=SpatialPool(), progress=False)
    assert emb.shape == (40, 128)


def test_out_streams_to_readonly_memmap(seed_cnn, x, tmp_path):
    path = tmp_path / "sub" / "emb.npy"
    in_memory, preds_mem = build_embeddings_and_predictions(seed_cnn, x, 2, batch_size=16, progress=False)
    emb, preds = build_embeddings_and_predictions(seed_cnn, x, 2, batch_size=16, out=path, progress=False)
    assert isinstance(emb, np.memmap) and not emb.flags.writeable
    assert emb.dtype == np.float32 and emb.shape == (40, 32, 26, 26)
    np.testing.assert_array_equal(emb, in_memory)
    np.testing.assert_array_equal(preds, preds_mem)
    np.testing.assert_array_equal(np.load(path), in_memory)
    assert os.listdir(path.parent) == ["emb.npy"]  # no temp file left


class _FailingDataset(Dataset):
    """28x28 images; item ``fail_at`` raises (a corrupt file, a dropped connection...)."""

    def __init__(self, n: int, fail_at: int):
        self.n, self.fail_at = n, fail_at

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if i == self.fail_at:
            raise RuntimeError(f"item {i} is unreadable")
        return torch.full((1, 28, 28), float(i) / self.n), i


def test_interrupted_capture_leaves_no_file(seed_cnn, tmp_path):
    path = tmp_path / "emb.npy"
    loader = DataLoader(_FailingDataset(40, fail_at=25), batch_size=8)
    with pytest.raises(RuntimeError, match="item 25 is unreadable"):
        build_embeddings_and_predictions(seed_cnn, loader, 2, out=path, progress=False)
    assert not path.exists()
    assert os.listdir(tmp_path) == []
    # A previous result at the path survives an interrupted rewrite.
    np.save(path, np.zeros(3, np.float32))
    with pytest.raises(RuntimeError):
        build_embeddings_and_predictions(seed_cnn, loader, 2, out=path, progress=False)
    np.testing.assert_array_equal(np.load(path), np.zeros(3, np.float32))
    assert os.listdir(tmp_path) == ["emb.npy"]
    with pytest.raises(RuntimeError):
        capture(seed_cnn, loader, ["1", "7"], out_dir=tmp_path / "layers", progress=False)
    assert os.listdir(tmp_path / "layers") == []


def test_dataset_and_dataloader_inputs(seed_cnn, x):
    y = torch.arange(40)
    ref_emb, ref_pred = build_embeddings_and_predictions(seed_cnn, x, 2, batch_size=8, progress=False)
    for data in [(x, y), TensorDataset(x, y), TensorDataset(x), DataLoader(TensorDataset(x, y), batch_size=8)]:
        emb, pred = build_embeddings_and_predictions(seed_cnn, data, 2, batch_size=8, progress=False)
        np.testing.assert_array_equal(emb, ref_emb)
        np.testing.assert_array_equal(pred, ref_pred)


def test_generic_dataset_and_drop_last(seed_cnn, tmp_path):
    data = _FailingDataset(30, fail_at=-1)
    emb, pred = build_embeddings_and_predictions(seed_cnn, data, 4, batch_size=7, progress=False)
    assert emb.shape == (30, 64, 24, 24) and pred.shape == (30, 10)
    loader = DataLoader(data, batch_size=7, drop_last=True)
    emb, pred = build_embeddings_and_predictions(seed_cnn, loader, 4, out=tmp_path / "e.npy", progress=False)
    assert emb.shape == (28, 64, 24, 24) and pred.shape == (28, 10)


class _Stream(IterableDataset):
    def __init__(self, x: torch.Tensor):
        self.x = x

    def __iter__(self):
        return iter(self.x)


def test_unknown_length_in_memory_ok_file_refused(seed_cnn, x, tmp_path):
    ref, _ = build_embeddings_and_predictions(seed_cnn, x, 2, batch_size=16, progress=False)
    emb, pred = build_embeddings_and_predictions(seed_cnn, _Stream(x), 2, batch_size=16, progress=False)
    np.testing.assert_array_equal(emb, ref)
    assert pred.shape == (40, 10)
    with pytest.raises(MocoError, match="needs the number of samples up front"):
        build_embeddings_and_predictions(seed_cnn, _Stream(x), 2, out=tmp_path / "e.npy", progress=False)
    assert os.listdir(tmp_path) == []


def test_model_rejects_batch(seed_cnn):
    with pytest.raises(MocoError, match=r"the model could not run on input shape \(4, 3, 28, 28\): RuntimeError: "):
        build_embeddings_and_predictions(seed_cnn, torch.randn(4, 3, 28, 28), 2, progress=False)
    with pytest.raises(MocoError, match=r"could not run on input shape \(4, 1, 20, 20\)"):  # fails in the tail
        build_embeddings_and_predictions(seed_cnn, torch.randn(4, 1, 20, 20), 2, progress=False)
    with pytest.raises(MocoError, match=r"could not run on input shape \(4, 3, 28, 28\)"):
        capture(seed_cnn, torch.randn(4, 3, 28, 28), ["1"], progress=False)
    assert _no_global_hooks() and _untouched(seed_cnn)


def test_nan_inputs_raise_inf_does_not(seed_cnn, x):
    bad = x.clone()
    bad[21, 0, 3, 3] = float("nan")
    with pytest.raises(MocoError, match="batch starting at sample 16 contain NaN"):
        build_embeddings_and_predictions(seed_cnn, bad, 2, batch_size=16, progress=False)
    with pytest.raises(MocoError, match="contain NaN"):
        capture(seed_cnn, bad, ["1"], progress=False)
    big = x.clone()
    big[0, 0, 0, 0] = float("inf")
    with pytest.warns(RuntimeWarning) as record:
        emb, _ = build_embeddings_and_predictions(seed_cnn, big, 2, progress=False)
    messages = [str(w.message) for w in record]
    assert "1 of 40 samples have NaN or inf in the output of layer '1'" in messages
    assert "1 of 40 samples have NaN or inf in the model output" in messages
    assert not np.isfinite(emb[0]).all() and np.isfinite(emb[1:]).all()


def test_bad_layer_for_embeddings(seed_cnn):
    with pytest.raises(MocoError, match="out of range"):
        build_embeddings_and_predictions(seed_cnn, torch.randn(2, 1, 28, 28), 12, progress=False)


def test_capture_resnet_layers_matches_manual_hooks(resnet, x):
    layers = ["stem", "layer1", "layer2.0", "layer3", "fc"]
    got = capture(resnet, x, layers, batch_size=16, processor=SpatialPool("avg"), progress=False)
    assert list(got) == layers
    manual: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    handles = [
        resnet.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: manual[name].append(o if o.dim() == 2 else o.mean(dim=(2, 3)))
        )
        for name in layers
    ]
    try:
        with torch.inference_mode():
            for i in range(0, len(x), 16):
                resnet(x[i : i + 16])
    finally:
        for handle in handles:
            handle.remove()
    widths = {"stem": 16, "layer1": 16, "layer2.0": 32, "layer3": 64, "fc": 10}
    for name in layers:
        assert got[name].shape == (40, widths[name]) and got[name].dtype == np.float32
        np.testing.assert_array_equal(got[name], torch.cat(manual[name]).numpy())
    assert _untouched(resnet) and _no_global_hooks()


def test_capture_equals_split_head(seed_cnn, x):
    got = capture(seed_cnn, x, "1", batch_size=16, progress=False)
    emb, _ = build_embeddings_and_predictions(seed_cnn, x, 2, batch_size=16, progress=False)
    np.testing.assert_array_equal(got["1"], emb)


def test_capture_out_dir(resnet, x, tmp_path):
    layers = ["layer1", "layer4"]
    in_memory = capture(resnet, x, layers, batch_size=16, progress=False)
    on_disk = capture(resnet, x, layers, batch_size=16, out_dir=tmp_path, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["layer1.npy", "layer4.npy"]
    for name in layers:
        assert isinstance(on_disk[name], np.memmap) and not on_disk[name].flags.writeable
        np.testing.assert_array_equal(on_disk[name], in_memory[name])
    assert in_memory["layer1"].shape == (40, 16, 28, 28)


class _WithSpare(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(4, 2)
        self.spare = nn.Linear(4, 4)  # registered, never called

    def forward(self, x):
        return self.used(x)


def test_capture_errors(resnet, x):
    with pytest.raises(MocoError, match=r"no module named 'layer7'; valid names include \['layer4'"):
        capture(resnet, x, ["layer1", "layer7"], progress=False)
    with pytest.raises(MocoError, match="'layer1.0.relu' runs more than once per forward pass"):
        capture(resnet, x, ["layer1.0.relu"], progress=False)
    with pytest.raises(MocoError, match=r"modules \['spare'\] did not run"):
        capture(_WithSpare(), torch.randn(3, 4), ["used", "spare"], progress=False)
    with pytest.raises(MocoError, match="layers is empty"):
        capture(resnet, x, [], progress=False)
    assert _untouched(resnet) and _no_global_hooks()


_MEMORY_PROBE = textwrap.dedent(
    """
    import os, sys, threading, time
    import numpy as np, torch
    torch.set_num_threads(1)
    from moco.capture import build_embeddings_and_predictions
    from moco.models import create

    def current():  # resident set size now, bytes (Linux)
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    torch.manual_seed(0)
    model = create("seed_cnn")
    x = torch.randn(2000, 1, 28, 28)
    folder = sys.argv[1]
    # Warm-up on a slice: allocator pools, oneDNN kernels and one batch's activations are in the baseline.
    build_embeddings_and_predictions(model, x[:200], 2, batch_size=100, progress=False,
                                     out=os.path.join(folder, "warm.npy"))
    before = current()
    seen = [before]
    done = threading.Event()
    def poll():  # the high-water mark of *this* capture, whatever the process held earlier
        while not done.is_set():
            seen.append(current())
            time.sleep(0.002)
    poller = threading.Thread(target=poll)
    poller.start()
    emb, _ = build_embeddings_and_predictions(model, x, 2, batch_size=100, progress=False,
                                              out=os.path.join(folder, "emb.npy"))
    done.set()
    poller.join()
    growth = max(seen) - before
    assert emb.shape == (2000, 32, 26, 26) and float(np.abs(emb[-1]).sum()) > 0
    nbytes = emb.nbytes
    del emb
    # Control: holding an array of that size in memory is visible to the probe.
    base = current()
    held = np.ones((2000, 32, 26, 26), np.float32)
    control = current() - base
    print(growth, control, nbytes)
    """
)


def test_out_keeps_peak_memory_far_below_array_size(tmp_path):
    pytest.importorskip("resource")
    result = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    growth, control, nbytes = map(int, result.stdout.split()[-3:])
    assert nbytes == 2000 * 32 * 26 * 26 * 4  # 173 MB
    assert control > nbytes // 2, (growth, control, nbytes)  # the probe can see an array of that size
    # streaming holds a few batches (each batch of 100 is 8.7 MB of embeddings plus activations), not the array
    assert growth < nbytes // 2, (growth, control, nbytes)
