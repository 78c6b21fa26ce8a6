"""Image classification data: CIFAR-10 archives, image-folder trees, a synthetic set.

``load_dataset(source)`` accepts

* the official python archive ``cifar-10-python.tar.gz`` or its extracted folder,
* the official binary archive ``cifar-10-binary.tar.gz`` or its extracted folder,
* an image-folder tree (``train/<class>/*``, ``test/<class>/*``), as a folder or a
  ``.tar``/``.tar.gz`` of one (e.g. ``../shared/datasets/cifar10_jpeg.tar.gz``),
* ``synthetic``: a deterministic, learnable 10-class set made from a seed.

Decoded arrays (uint8, NHWC) are cached as ``.npz`` keyed by the source's path, size and
mtime, so a second run starts in well under 2 s. Batches go through Gluon's
``ToTensor`` + ``Normalize`` with the training set's per-channel mean and std.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

from .errors import UserError

log = logging.getLogger(__name__)
CACHE_VERSION = 1
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass
class Dataset:
    """Decoded images (uint8, N x H x W x C) and int32 labels for both splits."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list
    source: str
    _mean_std: Optional[tuple] = field(default=None, repr=False, compare=False)

    @property
    def image_shape(self) -> tuple:
        return tuple(self.train_x.shape[1:])  # (H, W, C)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def mean_std(self) -> tuple:
        """Per-channel mean and std of the training images on the [0, 1] scale (computed once)."""
        if self._mean_std is None:
            x = self.train_x.reshape(-1, self.train_x.shape[-1]).astype(np.float64) / 255.0
            std = x.std(axis=0)
            self._mean_std = (tuple(float(v) for v in x.mean(axis=0)), tuple(float(max(v, 1e-3)) for v in std))
        return self._mean_std


def sample(count: int, n: int, seed: int = 0) -> np.ndarray:
    """Indices of ``n`` of ``count`` images drawn at random (in order; all when ``n`` is 0 or ``count``
    or more). Not the first ``n``: the shared CIFAR-10 copy is sorted by class, its first 2,000 test images
    are airplanes and cars.

    >>> sample(10, 4).tolist(), sample(3, 0).tolist()
    ([2, 4, 8, 9], [0, 1, 2])
    """
    if n <= 0 or n >= count:
        return np.arange(count)
    return np.sort(np.random.RandomState(seed).permutation(count)[:n])


# ----------------------------------------------------------------------------- synthetic
def synthetic(n_train: int, n_test: int, size: int = 16, channels: int = 3, seed: int = 0,
              noise: float = 22.0) -> Dataset:
    """Ten classes of oriented sinusoidal gratings: 5 orientations x 2 spatial frequencies.

    Each image gets a random phase, a random base colour and tint, +-10 % frequency jitter and
    Gaussian noise, so the classes share their mean colour and only spatial structure
    separates them.
    """
    rng = np.random.default_rng(seed)

    def make(n: int) -> tuple:
        y = np.arange(n) % 10
        rng.shuffle(y)
        theta = (y % 5) * np.pi / 5 + rng.uniform(-0.1, 0.1, n)
        freq = np.where(y < 5, 1.5, 3.5) * rng.uniform(0.9, 1.1, n)
        phase = rng.uniform(0, 2 * np.pi, n)
        coords = (np.arange(size) - size / 2) / size
        yy, xx = np.meshgrid(coords, coords, indexing="ij")
        arg = (xx[None] * np.cos(theta)[:, None, None] + yy[None] * np.sin(theta)[:, None, None])
        wave = np.sin(2 * np.pi * freq[:, None, None] * arg + phase[:, None, None])
        base = rng.uniform(70, 185, (n, 1, 1, channels))
        tint = rng.uniform(0.3, 1.0, (n, 1, 1, channels)) * 55
        img = base + tint * wave[..., None] + rng.normal(0, noise, (n, size, size, channels))
        return np.clip(np.rint(img), 0, 255).astype(np.uint8), y.astype(np.int32)

    tx, ty = make(n_train)
    vx, vy = make(n_test)
    return Dataset(tx, ty, vx, vy, [f"class{k}" for k in range(10)], "synthetic")


# ----------------------------------------------------------------------------- readers
def _unpickle(data: bytes) -> dict:
    return pickle.loads(data, encoding="bytes")


def _from_python_batches(read: Callable[[str], bytes], names: Iterable[str]) -> Dataset:
    names = set(names)

    def batch(name: str) -> tuple:
        d = _unpickle(read(name))
        x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return x, np.asarray(d[b"labels"], dtype=np.int32)

    train = [batch(f"data_batch_{i}") for i in range(1, 6) if f"data_batch_{i}" in names]
    test = batch("test_batch")
    classes = CIFAR10_CLASSES
    if "batches.meta" in names:
        classes = [c.decode() for c in _unpickle(read("batches.meta"))[b"label_names"]]
    return Dataset(np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train]),
                   test[0], test[1], classes, "")


def _from_binary_batches(read: Callable[[str], bytes], names: Iterable[str]) -> Dataset:
    names = set(names)

    def batch(name: str) -> tuple:
        raw = np.frombuffer(read(name), dtype=np.uint8)
        if raw.size % 3073:
            raise UserError(f"{name} is not a CIFAR-10 binary batch (size {raw.size} is not a multiple of 3073)")
        rec = raw.reshape(-1, 3073)
        return rec[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), rec[:, 0].astype(np.int32)

    train = [batch(f"data_batch_{i}.bin") for i in range(1, 6) if f"data_batch_{i}.bin" in names]
    test = batch("test_batch.bin")
    classes = CIFAR10_CLASSES
    if "batches.meta.txt" in names:
        classes = [c for c in read("batches.meta.txt").decode().split() if c]
    return Dataset(np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train]),
                   test[0], test[1], classes, "")


def _decode_tree(files: dict, read: Callable[[str], bytes], where: str) -> Dataset:
    """``files``: {split: {class: [member names]}} -> arrays; the first image fixes size and mode."""
    from PIL import Image

    for split in ("train", "test"):
        if split not in files:
            raise UserError(f"image folder {where} has no '{split}/' split "
                            "(expected train/<class>/* and test/<class>/*)")
        empty = [c for c, v in files[split].items() if not v]
        if empty or not files[split]:
            raise UserError(f"image folder {where}: class folder(s) {empty or '(none)'} in '{split}/' hold no images")
    if sorted(files["train"]) != sorted(files["test"]):
        diff = sorted(set(files["train"]) ^ set(files["test"]))
        raise UserError(f"image folder {where}: train/ and test/ have different classes ({', '.join(diff)}); "
                        "make them match")
    classes = sorted(files["train"])
    first = Image.open(io.BytesIO(read(files["train"][classes[0]][0])))
    mode = "L" if first.mode in ("L", "1", "I;16", "I") else "RGB"
    size = first.size

    def load(split: str) -> tuple:
        xs, ys = [], []
        for label, c in enumerate(classes):
            for name in sorted(files[split][c]):
                img = Image.open(io.BytesIO(read(name))).convert(mode)
                if img.size != size:
                    img = img.resize(size, Image.BILINEAR)
                arr = np.asarray(img, dtype=np.uint8)
                xs.append(arr[..., None] if arr.ndim == 2 else arr)
                ys.append(label)
        return np.stack(xs), np.asarray(ys, dtype=np.int32)

    tx, ty = load("train")
    vx, vy = load("test")
    return Dataset(tx, ty, vx, vy, classes, "")


def _tree_index(paths: Iterable[str]) -> dict:
    """Group ``.../train/<class>/<file>`` paths by split and class (any leading prefix)."""
    files: dict = {}
    for p in paths:
        parts = p.replace("\\", "/").split("/")
        if len(parts) < 3 or not p.lower().endswith(IMAGE_EXTS):
            continue
        split, cls = parts[-3], parts[-2]
        if split in ("train", "test"):
            files.setdefault(split, {}).setdefault(cls, []).append(p)
    return files


def _tree_classes_from_dirs(root: Path) -> dict:
    """Directory variant of ``_tree_index`` that also sees empty class folders."""
    files: dict = {}
    for split in ("train", "test"):
        d = root / split
        if not d.is_dir():
            continue
        for c in sorted(p for p in d.iterdir() if p.is_dir()):
            files.setdefault(split, {})[c.name] = [str(f) for f in c.iterdir() if f.suffix.lower() in IMAGE_EXTS]
    return files


def _read_tar(path: Path) -> Dataset:
    try:
        tf = tarfile.open(path)
    except (tarfile.TarError, OSError) as exc:
        raise UserError(f"{path} is not a readable tar archive ({exc})") from None
    with tf:
        members = {Path(m.name).name if "cifar-10-batches" in m.name else m.name: m
                   for m in tf.getmembers() if m.isfile()}

        def read(name: str) -> bytes:
            f = tf.extractfile(members[name])
            return f.read()

        if "data_batch_1" in members or "test_batch" in members:
            return _from_python_batches(read, members)
        if "test_batch.bin" in members:
            return _from_binary_batches(read, members)
        files = _tree_index(members)
        if not files:
            raise UserError(f"{path} holds no CIFAR-10 batches and no train/<class>/<image> tree; "
                            "pass cifar-10-python.tar.gz, cifar-10-binary.tar.gz or an image-folder tarball")
        return _decode_tree(files, read, str(path))


def _read_dir(path: Path) -> Dataset:
    for sub in (path, path / "cifar-10-batches-py", path / "cifar-10-batches-bin"):
        if (sub / "test_batch").is_file():
            return _from_python_batches(lambda n, s=sub: (s / n).read_bytes(), os.listdir(sub))
        if (sub / "test_batch.bin").is_file():
            return _from_binary_batches(lambda n, s=sub: (s / n).read_bytes(), os.listdir(sub))
    roots = [path] + sorted(p for p in path.iterdir() if p.is_dir())
    for root in roots:
        if (root / "train").is_dir() or (root / "test").is_dir():
            return _decode_tree(_tree_classes_from_dirs(root), lambda n: Path(n).read_bytes(), str(root))
    raise UserError(f"{path} holds no CIFAR-10 batches and no train/ and test/ class folders; "
                    "pass the official archive or an image-folder tree")


def _fingerprint(path: Path) -> str:
    st = path.stat()
    parts = [str(path.resolve()), str(CACHE_VERSION)]
    if path.is_dir():
        for dirpath, _, names in sorted(os.walk(path)):
            for n in sorted(names):
                s = os.stat(os.path.join(dirpath, n))
                parts.append(f"{n}:{s.st_size}:{s.st_mtime_ns}")
    else:
        parts.append(f"{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


def _atomic_savez(path: Path, **arrays: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # the process id keeps two runs that decode the same data at once from renaming each other's file
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_dataset(source: str, cache_dir: Optional[str] = ".cache/data", **synthetic_kw: int) -> Dataset:
    """Decode ``source`` (see module docstring) into a ``Dataset``, through the cache."""
    if source == "synthetic":
        return synthetic(**synthetic_kw)
    if source == "download":
        raise UserError("--data download is not supported offline; put cifar-10-python.tar.gz "
                        "(https://www.cs.toronto.edu/~kriz/cifar.html) on disk and pass its path")
    if not source:
        raise UserError("no data given; pass --data PATH to cifar-10-python.tar.gz, cifar-10-binary.tar.gz "
                        "or an image-folder tree (../shared/datasets/cifar10_jpeg.tar.gz here), or --data synthetic")
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"data path not found: {path}; pass --data PATH to cifar-10-python.tar.gz, "
                        "cifar-10-binary.tar.gz or an image-folder tree, or --data synthetic")
    if not os.access(path, os.R_OK):
        raise UserError(f"data path is not readable: {path}; check its permissions")
    cache = Path(cache_dir) / f"{path.name.split('.')[0]}-{_fingerprint(path)}.npz" if cache_dir else None
    if cache is not None and cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            return Dataset(z["train_x"], z["train_y"], z["test_x"], z["test_y"],
                           [str(c) for c in z["classes"]], str(path))
    if path.is_dir():
        ds = _read_dir(path)
    elif tarfile.is_tarfile(path):
        ds = _read_tar(path)
    else:
        raise UserError(f"{path} is not a dataset (neither a tar archive nor a folder); pass "
                        "cifar-10-python.tar.gz, cifar-10-binary.tar.gz or an image-folder tree")
    ds.source = str(path)
    if len(ds.train_x) == 0 or len(ds.test_x) == 0:
        raise UserError(f"{path}: the train or test split is empty")
    if cache is not None:
        _atomic_savez(cache, train_x=ds.train_x, train_y=ds.train_y, test_x=ds.test_x, test_y=ds.test_y,
                      classes=np.asarray(ds.classes))
        log.info("cached decoded arrays at %s", cache)
    return ds


def dataset_from_config(dcfg: object) -> Dataset:
    return load_dataset(dcfg.source, dcfg.cache_dir or None, n_train=dcfg.synthetic_train,
                        n_test=dcfg.synthetic_test, size=dcfg.synthetic_size,
                        channels=dcfg.synthetic_channels, seed=dcfg.synthetic_seed, noise=dcfg.synthetic_noise)


# ----------------------------------------------------------------------------- loaders
class CropFlip:
    """Batch augmentation: random crop with ``pad`` zero pixels on each side, then a random
    horizontal flip, per image. Used as the DataLoader's ``batchify_fn`` so that numpy pads
    a whole batch at once; its own generator keeps runs reproducible."""

    def __init__(self, pad: int = 4, seed: int = 0):
        self.pad = pad
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def augment(self, x: np.ndarray) -> np.ndarray:
        n, h, w = x.shape[:3]
        p = self.pad
        padded = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
        offs = self.rng.integers(0, 2 * p + 1, (n, 2))
        flips = self.rng.random(n) < 0.5
        out = np.empty_like(x)
        for i, (dy, dx) in enumerate(offs):
            crop = padded[i, dy:dy + h, dx:dx + w]
            out[i] = crop[:, ::-1] if flips[i] else crop
        return out

    def __call__(self, samples: list) -> tuple:
        import mxnet as mx

        x = np.stack([s[0] for s in samples])
        y = np.asarray([s[1] for s in samples], dtype=np.int32)
        return mx.nd.array(self.augment(x), dtype=np.uint8), mx.nd.array(y, dtype=np.int32)


def make_loaders(ds: Dataset, batch_size: int, eval_batch_size: int, augment: bool, seed: int) -> tuple:
    """Gluon DataLoaders of uint8 NHWC batches (train shuffled, last partial batch dropped)."""
    from mxnet import gluon

    if batch_size > len(ds.train_x):
        raise UserError(f"batch size {batch_size} is larger than the training set ({len(ds.train_x)} images); "
                        "lower data.batch_size")
    train = gluon.data.ArrayDataset(ds.train_x, ds.train_y)
    batchify = CropFlip(4, seed) if augment else None
    train_loader = gluon.data.DataLoader(train, batch_size=batch_size, shuffle=True, last_batch="discard",
                                         batchify_fn=batchify)
    test_loader = gluon.data.DataLoader(gluon.data.ArrayDataset(ds.test_x, ds.test_y),
                                        batch_size=eval_batch_size, shuffle=False, last_batch="keep")
    return train_loader, test_loader


def calib_loader(ds: Dataset, batch_size: int, batches: int, seed: int) -> object:
    """A fixed random subset of ``batches * batch_size`` training images (no augmentation), the same
    for every call with the same seed: post-training calibration sees the same images every time."""
    from mxnet import gluon

    n = min(len(ds.train_x), batches * batch_size)
    idx = np.sort(np.random.default_rng(seed).permutation(len(ds.train_x))[:n])
    return gluon.data.DataLoader(gluon.data.ArrayDataset(ds.train_x[idx], ds.train_y[idx]),
                                 batch_size=batch_size, shuffle=False, last_batch="keep")


def normalizer(mean: tuple, std: tuple) -> object:
    """Batch transform: uint8 NHWC -> float32 NCHW, ``(x / 255 - mean) / std``."""
    from mxnet.gluon import nn
    from mxnet.gluon.data.vision import transforms

    t = nn.HybridSequential()
    t.add(transforms.ToTensor(), transforms.Normalize(mean, std))
    t.hybridize()
    return t
