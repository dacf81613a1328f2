"""The built-in example: synthetic EM volume cache, crop dataset and 3-D U-Net."""

from __future__ import annotations

import functools
import json
import math
import os
import pickle
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_threadsafe.examples import EMCropDataset, UNet3D, make_synthetic_volume
from lightning_threadsafe.examples import dataset as dataset_mod
from lightning_threadsafe.examples import volume as volume_mod
from lightning_threadsafe.rng import sample_context

SHAPE = (64, 48, 48)
CHUNK = 16


@pytest.fixture(scope="module")
def vol(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small volume shared by the read-only tests (64 x 48 x 48, chunks of 16 slices)."""
    return make_synthetic_volume(tmp_path_factory.mktemp("em") / "vol", shape=SHAPE,
                                 chunk_depth=CHUNK, seed=1)


@pytest.fixture
def vol_copy(vol: Path, tmp_path: Path) -> Path:
    """A private copy of the small volume, for tests that damage it."""
    dst = tmp_path / "vol"
    shutil.copytree(vol, dst)
    return dst


def _make(root: Path) -> Path:
    return make_synthetic_volume(root, shape=SHAPE, chunk_depth=CHUNK, seed=1)


def _full(root: Path, kind: str) -> np.ndarray:
    return np.concatenate([np.load(p) for p in sorted(root.glob(f"{kind}_*.npy"))])


def _mtimes(root: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in root.iterdir()}


# ----------------------------------------------------------------------------- volume


def test_volume_layout_and_manifest(vol: Path) -> None:
    manifest = json.loads((vol / "manifest.json").read_text())
    assert manifest["shape"] == list(SHAPE)
    assert manifest["chunk_depth"] == CHUNK and manifest["seed"] == 1
    assert manifest["dtype"] == {"raw": "uint8", "labels": "uint8"}
    assert [(c["z0"], c["z1"]) for c in manifest["chunks"]] == [(0, 16), (16, 32), (32, 48),
                                                                (48, 64)]
    for name, info in manifest["files"].items():
        assert (vol / name).stat().st_size == info["bytes"]
    raw = np.load(vol / "raw_001.npy", mmap_mode="r")
    assert isinstance(raw, np.memmap) and raw.shape == (16, 48, 48) and raw.dtype == np.uint8
    labels = _full(vol, "labels")
    assert set(np.unique(labels)) == {0, 1}
    assert 0.05 < labels.mean() < 0.6  # membranes are a minority, but present
    full = _full(vol, "raw").astype(np.float32)
    # Membranes are darker than cell interiors.
    assert full[labels == 1].mean() + 20 < full[labels == 0].mean()
    assert manifest["raw_mean"] == pytest.approx(full.mean(), rel=1e-4)


def test_reused_when_valid(vol: Path) -> None:
    before = _mtimes(vol)
    assert _make(vol) == vol
    assert _mtimes(vol) == before


@pytest.mark.parametrize("damage", ["truncate", "corrupt_header", "corrupt_tail",
                                    "missing_manifest", "missing_chunk", "bad_manifest"])
def test_regenerated_when_damaged(vol: Path, vol_copy: Path, damage: str) -> None:
    chunk = vol_copy / "raw_002.npy"
    if damage == "truncate":
        os.truncate(chunk, chunk.stat().st_size - 100)
    elif damage in ("corrupt_header", "corrupt_tail"):
        with open(chunk, "r+b") as f:
            f.seek(20 if damage == "corrupt_header" else chunk.stat().st_size - 5)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
    elif damage == "missing_manifest":
        (vol_copy / "manifest.json").unlink()
    elif damage == "missing_chunk":
        (vol_copy / "labels_003.npy").unlink()
    else:
        (vol_copy / "manifest.json").write_text('{"version": 1, "shape": [')
    assert volume_mod._load_valid_manifest(vol_copy) is None

    assert _make(vol_copy) == vol_copy
    assert volume_mod._load_valid_manifest(vol_copy) is not None
    # Same seed, same machine: the same volume again.
    np.testing.assert_array_equal(_full(vol_copy, "raw"), _full(vol, "raw"))
    np.testing.assert_array_equal(_full(vol_copy, "labels"), _full(vol, "labels"))
    leftovers = [p.name for p in vol_copy.parent.iterdir() if p.name != "vol"]
    assert leftovers == []  # no temp dir, trash dir or lock left behind


def test_regenerated_when_parameters_differ(vol_copy: Path) -> None:
    make_synthetic_volume(vol_copy, shape=SHAPE, chunk_depth=32, seed=1)
    manifest = json.loads((vol_copy / "manifest.json").read_text())
    assert manifest["chunk_depth"] == 32 and len(manifest["chunks"]) == 2
    assert sorted(p.name for p in vol_copy.glob("raw_*")) == ["raw_000.npy", "raw_001.npy"]


def test_force_regenerates(vol_copy: Path) -> None:
    before = _mtimes(vol_copy)
    make_synthetic_volume(vol_copy, shape=SHAPE, chunk_depth=CHUNK, seed=1, force=True)
    assert _mtimes(vol_copy) != before


def test_killed_generation_leaves_no_valid_cache(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = np.save
    calls = []

    def dying_save(file, arr, *args, **kwargs):  # dies while writing the third file
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_write(file, arr, *args, **kwargs)

    monkeypatch.setattr(volume_mod.np, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        _make(tmp_path / "vol")
    monkeypatch.undo()
    assert not (tmp_path / "vol").exists()
    assert volume_mod._load_valid_manifest(tmp_path / "vol") is None
    assert list(tmp_path.iterdir()) == []  # temp dir and lock cleaned up
    assert volume_mod._load_valid_manifest(_make(tmp_path / "vol")) is not None


_KILL_SCRIPT = """
import importlib.util, os, sys
import numpy as np
# Load volume.py alone (not the package, which imports Lightning): a faster start.
spec = importlib.util.spec_from_file_location("volume", sys.argv[2])
volume = importlib.util.module_from_spec(spec)
spec.loader.exec_module(volume)
real_save, calls = np.save, []
def save_then_die(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        os._exit(9)  # a hard kill: no finally blocks, no cleanup
    real_save(*args, **kwargs)
np.save = save_then_die
volume.make_synthetic_volume(sys.argv[1], shape=(64, 48, 48), chunk_depth=16, seed=1)
"""


def test_hard_killed_generation_is_recovered(tmp_path: Path) -> None:
    root = tmp_path / "vol"
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(root), volume_mod.__file__],
                          timeout=120)
    assert proc.returncode == 9
    # What a kill leaves: a stale lock and a partial temp dir -- never a valid root.
    assert not root.exists()
    assert (tmp_path / ".vol.lock").exists()
    (partial,) = tmp_path.glob(".vol.tmp-*")
    assert not (partial / "manifest.json").exists()
    assert volume_mod._load_valid_manifest(_make(root)) is not None
    assert not (tmp_path / ".vol.lock").exists()


def test_old_leftovers_are_removed(vol_copy: Path) -> None:
    old = vol_copy.parent / ".vol.tmp-1-deadbeef"
    old.mkdir()
    (old / "raw_000.npy").write_bytes(b"partial")
    past = old.stat().st_mtime - 10 * volume_mod._STALE_AFTER_S
    os.utime(old, (past, past))
    (vol_copy / "manifest.json").unlink()
    _make(vol_copy)
    assert not old.exists()


def test_concurrent_callers_generate_once(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    generations = []
    real_generate = volume_mod._generate

    def counting_generate(*args):
        generations.append(threading.current_thread().name)
        return real_generate(*args)

    monkeypatch.setattr(volume_mod, "_generate", counting_generate)
    root = tmp_path / "vol"
    barrier = threading.Barrier(3)
    results: dict[int, object] = {}

    def call(k: int) -> None:
        barrier.wait(timeout=30)
        try:
            results[k] = _make(root)
        except BaseException as exc:  # reported below
            results[k] = exc

    threads = [threading.Thread(target=call, args=(k,), name=f"caller-{k}") for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == {0: root, 1: root, 2: root}
    assert len(generations) == 1
    assert volume_mod._load_valid_manifest(root) is not None


def test_stale_lock_of_dead_process_is_broken(tmp_path: Path) -> None:
    if os.name != "posix":
        pytest.skip("dead-owner detection is POSIX-only")
    lock = tmp_path / ".vol.lock"
    lock.write_text(f"{socket.gethostname()} 999999999\n")  # no such pid
    assert volume_mod._load_valid_manifest(_make(tmp_path / "vol")) is not None
    assert not lock.exists()


def test_live_lock_times_out(tmp_path: Path) -> None:
    lock = tmp_path / ".vol.lock"
    lock.write_text(f"{socket.gethostname()} {os.getpid()}\n")  # held by a live process: us
    with pytest.raises(TimeoutError, match="delete the lock file"):
        make_synthetic_volume(tmp_path / "vol", shape=SHAPE, lock_timeout=0.2)
    assert lock.exists()


def test_refuses_to_replace_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="root="):
        make_synthetic_volume(tmp_path, shape=SHAPE, chunk_depth=CHUNK)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_default_root_uses_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LTS_CACHE_DIR", str(tmp_path))
    root = make_synthetic_volume(shape=SHAPE, chunk_depth=CHUNK, seed=2)
    assert root.parent == tmp_path
    assert root.name == f"em_volume_v{volume_mod.VOLUME_VERSION}_64x48x48_c16_s2"


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"shape": (64, 64)}, "shape"), ({"shape": (64, 4, 64)}, "shape"),
    ({"chunk_depth": 0}, "chunk_depth"), ({"seed": -1}, "seed"),
    ({"lock_timeout": 0}, "lock_timeout"),
])
def test_volume_argument_errors(tmp_path: Path, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=f"{name}="):
        make_synthetic_volume(tmp_path / "vol", **kwargs)


# ----------------------------------------------------------------------------- dataset


def _sample(ds: EMCropDataset, index: int, seed: int = 0, epoch: int = 0) -> dict:
    with sample_context(seed, epoch, index):
        return ds[index]


def _equal(a: dict, b: dict) -> bool:
    return (torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
            and a["index"] == b["index"])


def test_sample_format(vol: Path) -> None:
    ds = EMCropDataset(vol, crop=16, samples_per_epoch=10)
    s = _sample(ds, 3)
    assert len(ds) == 10 and s["index"] == 3
    assert s["image"].shape == s["mask"].shape == (1, 16, 16, 16)
    assert s["image"].dtype == s["mask"].dtype == torch.float32
    assert set(s["mask"].unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(IndexError):
        ds[10]


def test_train_samples_are_deterministic(vol: Path) -> None:
    ds = EMCropDataset(vol, crop=16)
    a = _sample(ds, 7, seed=3, epoch=1)
    assert _equal(a, _sample(ds, 7, seed=3, epoch=1))
    assert not torch.equal(a["image"], _sample(ds, 8, seed=3, epoch=1)["image"])
    assert not torch.equal(a["image"], _sample(ds, 7, seed=3, epoch=2)["image"])


def test_val_samples_depend_only_on_index(vol: Path) -> None:
    ds = EMCropDataset(vol, crop=12, split="val")
    a = _sample(ds, 4, seed=0, epoch=0)
    assert _equal(a, _sample(ds, 4, seed=9, epoch=5))
    assert not torch.equal(a["image"], _sample(ds, 5)["image"])


def test_crops_stay_inside_their_split(vol: Path) -> None:
    train_end = int(SHAPE[0] * 0.8)
    for split, crop in (("train", (16, 16, 16)), ("val", (12, 20, 8))):
        ds = EMCropDataset(vol, crop=crop, split=split, samples_per_epoch=200)
        origins = []
        real_read = ds.read

        def spy(z0: int, y0: int, x0: int, _read=real_read, _origins=origins):
            _origins.append((z0, y0, x0))
            return _read(z0, y0, x0)

        ds.read = spy  # type: ignore[method-assign]
        for i in range(len(ds)):
            _sample(ds, i)
        z0s = np.array([o[0] for o in origins])
        if split == "train":
            assert z0s.min() >= 0 and z0s.max() + crop[0] <= train_end
        else:
            assert z0s.min() >= train_end and z0s.max() + crop[0] <= SHAPE[0]
        assert max(o[1] for o in origins) + crop[1] <= SHAPE[1]
        assert max(o[2] for o in origins) + crop[2] <= SHAPE[2]
        assert len(set(origins)) > 50  # crops are spread out


@pytest.mark.parametrize(("z0", "depth"), [(10, 16), (16, 16), (5, 40), (0, 51)])
def test_read_across_chunk_boundaries(vol: Path, z0: int, depth: int) -> None:
    ds = EMCropDataset(vol, crop=(depth, 9, 11))
    raw, labels = ds.read(z0, 3, 30)
    np.testing.assert_array_equal(raw, _full(vol, "raw")[z0:z0 + depth, 3:12, 30:41])
    np.testing.assert_array_equal(labels, _full(vol, "labels")[z0:z0 + depth, 3:12, 30:41])
    with pytest.raises(ValueError, match="origin="):
        ds.read(SHAPE[0] - depth + 1, 0, 0)


def test_sample_matches_volume_without_augmentation(vol: Path) -> None:
    ds = EMCropDataset(vol, crop=16, flips=False, normalize=False)
    origins = []
    real_read = ds.read
    ds.read = lambda *o: origins.append(o) or real_read(*o)  # type: ignore[method-assign]
    s = _sample(ds, 2)
    (z0, y0, x0), = origins
    expected = _full(vol, "raw")[z0:z0 + 16, y0:y0 + 16, x0:x0 + 16].astype(np.float32)
    np.testing.assert_array_equal(s["image"][0].numpy(), expected)


def test_normalized_images_are_standardized(vol: Path) -> None:
    ds = EMCropDataset(vol, crop=32, samples_per_epoch=16)
    images = torch.stack([_sample(ds, i)["image"] for i in range(len(ds))])
    assert abs(images.mean().item()) < 0.5 and 0.5 < images.std().item() < 2.0


def test_threads_load_what_serial_loading_loads(vol: Path) -> None:
    ds = EMCropDataset(vol, crop=16, samples_per_epoch=64)
    serial = [_sample(ds, i, seed=5, epoch=2) for i in range(len(ds))]
    n_threads = 4
    barrier = threading.Barrier(n_threads)
    results: dict[int, dict] = {}
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            barrier.wait(timeout=30)  # all threads load at the same time
            for i in range(k, len(ds), n_threads):
                results[i] = _sample(ds, i, seed=5, epoch=2)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,), name=f"loader-{k}")
               for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert all(_equal(serial[i], results[i]) for i in range(len(ds)))
    # One set of memory maps per thread that read (the main thread + 4 loaders).
    assert ds._chunks.stats()["instances_created"] == 1 + n_threads
    ds.close()
    ds.close()
    assert ds._chunks.stats()["instances_open"] == 0


def test_pickle_round_trip(vol: Path) -> None:
    ds = EMCropDataset(vol, crop=16, split="train", latency_ms=0.5)
    before = _sample(ds, 11)  # opens this thread's memory maps
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._chunks.stats()["instances_open"] == 0  # handles were not pickled
    assert clone.latency_ms == 0.5 and clone.crop == (16, 16, 16)
    assert _equal(before, _sample(clone, 11))


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"crop": 0}, "crop"), ({"crop": (8, 8)}, "crop"), ({"crop": 60}, "crop"),
    ({"crop": (16, 16, 16), "split": "val"}, "crop"),  # val has 13 slices
    ({"samples_per_epoch": 0}, "samples_per_epoch"), ({"split": "test"}, "split"),
    ({"latency_ms": -1.0}, "latency_ms"), ({"flips": 1}, "flips"),
])
def test_dataset_argument_errors(vol: Path, kwargs: dict, name: str) -> None:
    with pytest.raises((ValueError, TypeError), match=f"{name}="):
        EMCropDataset(vol, **kwargs)


def test_dataset_generates_into_empty_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A small volume for speed: the default shape is exercised by the README's training run.
    monkeypatch.setattr(dataset_mod, "make_synthetic_volume",
                        functools.partial(make_synthetic_volume, shape=SHAPE, chunk_depth=CHUNK))
    ds = EMCropDataset(tmp_path / "new", crop=16)
    assert ds.shape == SHAPE and (tmp_path / "new" / "manifest.json").exists()

# ----------------------------------------------------------------------------- model


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")  # Lightning's
def test_model_fits_and_validates(vol: Path) -> None:
    train = DataLoader(EMCropDataset(vol, crop=16, samples_per_epoch=8), batch_size=4)
    val = DataLoader(EMCropDataset(vol, crop=12, split="val", samples_per_epoch=4), batch_size=2)
    model = UNet3D(base_channels=4, lr=1e-3)
    kwargs = {"accelerator": "cpu", "logger": False, "enable_checkpointing": False,
              "enable_progress_bar": False, "enable_model_summary": False}
    trainer = L.Trainer(max_steps=2, limit_val_batches=0, **kwargs)
    trainer.fit(model, train)
    assert trainer.global_step == 2
    assert math.isfinite(trainer.callback_metrics["train/loss"].item())
    metrics = L.Trainer(**kwargs).validate(model, val, verbose=False)[0]
    assert math.isfinite(metrics["val/loss"]) and 0.0 <= metrics["val/dice"] <= 1.0


def test_model_shapes_and_arguments() -> None:
    model = UNet3D(in_channels=2, base_channels=6, step_delay_ms=1.5)
    assert model.hparams.step_delay_ms == 1.5 and model.hparams.base_channels == 6
    assert model(torch.zeros(1, 2, 8, 12, 16)).shape == (1, 1, 8, 12, 16)
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.zeros(1, 2, 8, 8, 10))
    for kwargs, name in (({"base_channels": 0}, "base_channels"), ({"lr": 0.0}, "lr"),
                         ({"step_delay_ms": -1}, "step_delay_ms"),
                         ({"in_channels": 1.5}, "in_channels")):
        with pytest.raises(ValueError, match=f"{name}="):
            UNet3D(**kwargs)
