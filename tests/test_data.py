"""Dataset readers on fixtures built here: official python/binary formats, image trees, cache."""
from __future__ import annotations

import io
import pickle
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from train_quantization import data as data_mod
from train_quantization.errors import UserError

RNG = np.random.default_rng(0)


def _images(n, h=32, w=32, c=3):
    return RNG.integers(0, 256, (n, h, w, c), dtype=np.uint8)


def _add(tf: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tf.addfile(info, io.BytesIO(payload))


def _python_archive(path, train_x, train_y, test_x, test_y):
    def batch(x, y):
        return pickle.dumps({b"data": x.transpose(0, 3, 1, 2).reshape(len(x), -1), b"labels": list(map(int, y))})

    with tarfile.open(path, "w:gz") as tf:
        _add(tf, "cifar-10-batches-py/data_batch_1", batch(train_x[:6], train_y[:6]))
        _add(tf, "cifar-10-batches-py/data_batch_2", batch(train_x[6:], train_y[6:]))
        _add(tf, "cifar-10-batches-py/test_batch", batch(test_x, test_y))
        _add(tf, "cifar-10-batches-py/batches.meta", pickle.dumps({b"label_names": [b"a", b"b", b"c"]}))


def test_python_format_archive_and_folder(tmp_path):
    tx, ty, vx, vy = _images(10), RNG.integers(0, 3, 10), _images(4), RNG.integers(0, 3, 4)
    arc = tmp_path / "cifar-10-python.tar.gz"
    _python_archive(arc, tx, ty, vx, vy)
    ds = data_mod.load_dataset(str(arc), cache_dir=None)
    assert np.array_equal(ds.train_x, tx) and np.array_equal(ds.train_y, ty)
    assert np.array_equal(ds.test_x, vx) and np.array_equal(ds.test_y, vy) and ds.classes == ["a", "b", "c"]
    with tarfile.open(arc) as tf:
        tf.extractall(tmp_path / "ex")
    ds2 = data_mod.load_dataset(str(tmp_path / "ex"), cache_dir=None)  # the folder holding cifar-10-batches-py
    assert np.array_equal(ds2.train_x, tx) and np.array_equal(ds2.test_y, vy)


def test_binary_format(tmp_path):
    tx, ty, vx, vy = _images(5), RNG.integers(0, 10, 5), _images(3), RNG.integers(0, 10, 3)

    def records(x, y):
        return b"".join(bytes([int(lab)]) + img.transpose(2, 0, 1).tobytes() for img, lab in zip(x, y))

    d = tmp_path / "cifar-10-batches-bin"
    d.mkdir()
    (d / "data_batch_1.bin").write_bytes(records(tx, ty))
    (d / "test_batch.bin").write_bytes(records(vx, vy))
    (d / "batches.meta.txt").write_text("\n".join(data_mod.CIFAR10_CLASSES) + "\n")
    ds = data_mod.load_dataset(str(tmp_path), cache_dir=None)
    assert np.array_equal(ds.train_x, tx) and np.array_equal(ds.train_y, ty) and np.array_equal(ds.test_x, vx)
    assert ds.classes == data_mod.CIFAR10_CLASSES
    with tarfile.open(tmp_path / "cifar-10-binary.tar.gz", "w:gz") as tf:
        tf.add(d, arcname="cifar-10-batches-bin")
    ds2 = data_mod.load_dataset(str(tmp_path / "cifar-10-binary.tar.gz"), cache_dir=None)
    assert np.array_equal(ds2.test_y, vy)


def _tree(root, classes, n, size, mode, splits=("train", "test")):
    for split in splits:
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                arr = _images(1, size, size, 1 if mode == "L" else 3)[0]
                Image.fromarray(arr[..., 0] if mode == "L" else arr, mode).save(d / f"{i}.png")


@pytest.mark.parametrize("mode,channels", [("L", 1), ("RGB", 3)])
def test_image_tree_tarball_any_size_and_channels(tmp_path, mode, channels):
    root = tmp_path / "tree" / "mydata"
    _tree(root, ["zebra", "apple", "mango"], 3, 20, mode)
    with tarfile.open(tmp_path / "d.tar.gz", "w:gz") as tf:
        tf.add(root, arcname="mydata")
    ds = data_mod.load_dataset(str(tmp_path / "d.tar.gz"), cache_dir=None)
    assert ds.train_x.shape == (9, 20, 20, channels) and ds.test_x.shape == (9, 20, 20, channels)
    assert ds.classes == ["apple", "mango", "zebra"]  # sorted by name
    assert ds.train_y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    first = np.asarray(Image.open(root / "train" / "apple" / "0.png"))
    assert np.array_equal(ds.train_x[0].squeeze(), first)
    ds_dir = data_mod.load_dataset(str(tmp_path / "tree"), cache_dir=None)  # the folder too
    assert np.array_equal(ds_dir.train_x, ds.train_x)


def test_cache_makes_second_load_fast_and_tracks_changes(tmp_path):
    root = tmp_path / "tree"
    _tree(root, ["a", "b"], 40, 32, "RGB")
    with tarfile.open(tmp_path / "d.tar", "w") as tf:
        tf.add(root, arcname="x")
    cache = tmp_path / "cache"
    ds1 = data_mod.load_dataset(str(tmp_path / "d.tar"), cache_dir=str(cache))
    assert len(list(cache.glob("*.npz"))) == 1
    t = time.time()
    ds2 = data_mod.load_dataset(str(tmp_path / "d.tar"), cache_dir=str(cache))
    assert time.time() - t < 2.0
    assert np.array_equal(ds1.train_x, ds2.train_x) and ds1.classes == ds2.classes
    time.sleep(0.01)
    (tmp_path / "d.tar").touch()  # a changed source gets a new cache entry
    data_mod.load_dataset(str(tmp_path / "d.tar"), cache_dir=str(cache))
    assert len(list(cache.glob("*.npz"))) == 2


def test_cache_write_survives_a_second_process_writing_the_same_entry(tmp_path, monkeypatch):
    """Two runs started together decode the same data: each renames only its own temporary file."""
    import multiprocessing as mp
    real_savez, target = np.savez, tmp_path / "c" / "d.npz"

    def savez_then_other_process(file, **arrays):
        real_savez(file, **arrays)
        if mp.current_process().name == "MainProcess":  # the other writer finishes between our write and rename
            child = mp.get_context("fork").Process(target=data_mod._atomic_savez, args=(target,), kwargs=arrays)
            child.start()
            child.join()
            assert child.exitcode == 0

    monkeypatch.setattr(data_mod.np, "savez", savez_then_other_process)
    data_mod._atomic_savez(target, a=np.arange(3))
    with np.load(target) as z:
        assert z["a"].tolist() == [0, 1, 2]
    assert [p.name for p in target.parent.iterdir()] == ["d.npz"]


def test_synthetic_is_deterministic_learnable_and_not_colour_separable():
    a = data_mod.synthetic(600, 200, 16, 3, seed=5)
    b = data_mod.synthetic(600, 200, 16, 3, seed=5)
    assert np.array_equal(a.train_x, b.train_x) and np.array_equal(a.test_y, b.test_y)
    assert not np.array_equal(a.train_x, data_mod.synthetic(600, 200, 16, 3, seed=6).train_x)
    assert np.bincount(a.train_y).tolist() == [60] * 10
    # nearest class centroid of the mean colour: near chance (10 classes)
    feat = a.train_x.reshape(600, -1, 3).mean(1)
    cent = np.stack([feat[a.train_y == k].mean(0) for k in range(10)])
    tfeat = a.test_x.reshape(200, -1, 3).mean(1)
    acc = np.mean(np.argmin(((tfeat[:, None] - cent[None]) ** 2).sum(-1), 1) == a.test_y)
    assert acc < 0.2
    assert data_mod.synthetic(10, 10, 12, 1).train_x.shape == (10, 12, 12, 1)


def test_bad_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        data_mod.load_dataset(str(tmp_path / "missing.tar.gz"))
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(UserError, match="not a dataset"):
        data_mod.load_dataset(str(txt), cache_dir=None)
    _tree(tmp_path / "notest", ["a", "b"], 2, 8, "RGB", splits=("train",))
    with pytest.raises(UserError, match="no 'test/' split"):
        data_mod.load_dataset(str(tmp_path / "notest"), cache_dir=None)
    _tree(tmp_path / "empty", ["a", "b"], 2, 8, "RGB")
    (tmp_path / "empty" / "train" / "c").mkdir()
    (tmp_path / "empty" / "test" / "c").mkdir()
    with pytest.raises(UserError, match="hold no images"):
        data_mod.load_dataset(str(tmp_path / "empty"), cache_dir=None)
    _tree(tmp_path / "differ", ["a", "b"], 2, 8, "RGB")
    (tmp_path / "differ" / "test" / "b").rename(tmp_path / "differ" / "test" / "z")
    with pytest.raises(UserError, match="different classes"):
        data_mod.load_dataset(str(tmp_path / "differ"), cache_dir=None)
    with pytest.raises(UserError, match="larger than the training set"):
        data_mod.make_loaders(data_mod.synthetic(10, 10), 64, 10, False, 0)
