"""Finding and decoding the raw arrays of each named dataset.

Search order for a named dataset (first hit wins): an explicit ``root``, ``$NETSLIM_DATA``,
``../shared/data``, ``/usr/share/datasets`` (Debian's ``dataset-fashion-mnist``), then
torchvision's download into netslim's cache when a network is there.
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
from zlib import error as zlib_error
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import NetslimError
from ..io import atomic_write
from ..paths import cache_dir, shared_dir
from .idx import read_idx


@dataclass
class RawSplit:
    """uint8 images in NCHW and int64 labels."""

    images: np.ndarray
    labels: np.ndarray


def search_roots(root: str | Path | None = None) -> list[Path]:
    roots: list[Path] = []
    if root is not None:
        roots.append(Path(root))
    if os.environ.get("NETSLIM_DATA"):
        roots.append(Path(os.environ["NETSLIM_DATA"]))
    shared = shared_dir()
    if shared is not None:
        roots.append(shared / "data")
    roots.append(Path("/usr/share/datasets"))
    return roots


# ---------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_idx_dir(base: Path, subdirs: tuple[str, ...]) -> Path | None:
    for sub in subdirs:
        d = base / sub if sub else base
        if all(_idx_file(d, n) is not None for pair in _IDX_FILES.values() for n in pair):
            return d
    return None


def _idx_file(d: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (d / name).is_file():
            return d / name
    return None


def _load_idx(d: Path, split: str) -> RawSplit:
    images_stem, labels_stem = _IDX_FILES[split]
    images = read_idx(_idx_file(d, images_stem))
    labels = read_idx(_idx_file(d, labels_stem)).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise NetslimError(f"{d}: {images.shape[0]} images but {labels.shape[0]} labels")
    return RawSplit(images[:, None, :, :], labels)


# ---------------------------------------------------------------- CIFAR
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _decode_cifar_jpeg_tar(tar_path: Path) -> dict[str, RawSplit]:
    """Decode ``train/<class>/NNNN.jpg`` and ``test/<class>/NNNN.jpg`` once (PIL), sorted by path."""
    from PIL import Image
    from tqdm import tqdm

    index = {c: i for i, c in enumerate(CIFAR10_CLASSES)}
    found: dict[str, list[tuple[str, int, np.ndarray]]] = {"train": [], "test": []}
    member = None
    try:
        with tarfile.open(tar_path, "r:gz") as tar:
            for member in tqdm(tar, desc=f"decoding {tar_path.name} (once)", unit=" files", mininterval=2,
                               disable=None):
                if not member.isfile() or not member.name.lower().endswith((".jpg", ".jpeg")):
                    continue
                parts = Path(member.name).parts
                if len(parts) < 3 or parts[-3] not in found or parts[-2] not in index:
                    continue
                data = tar.extractfile(member).read()
                if len(data) > 1 << 20:
                    raise NetslimError(f"{tar_path}:{member.name} is {len(data):,} bytes, not a 32x32 JPEG")
                try:
                    with Image.open(io.BytesIO(data)) as im:
                        if im.size != (32, 32):
                            raise NetslimError(f"{tar_path}:{member.name} is {im.size[0]}x{im.size[1]}, "
                                               "expected 32x32 RGB")
                        img = np.asarray(im.convert("RGB"), dtype=np.uint8)
                except NetslimError:
                    raise
                except Exception as exc:  # UnidentifiedImageError, truncated data, decoder errors
                    raise NetslimError(f"{tar_path}:{member.name} is not a readable JPEG "
                                       f"({type(exc).__name__})") from None
                if img.shape != (32, 32, 3):
                    raise NetslimError(f"{tar_path}:{member.name} is {img.shape}, expected 32x32 RGB")
                found[parts[-3]].append((member.name, index[parts[-2]], img))
    except (tarfile.TarError, EOFError, OSError, zlib_error) as exc:
        where = f" after {member.name}" if member is not None else ""
        raise NetslimError(f"{tar_path} is damaged or truncated{where} ({type(exc).__name__}); "
                           "download it again") from None
    out = {}
    for split, items in found.items():
        if not items:
            raise NetslimError(f"{tar_path} holds no {split}/<class>/*.jpg images")
        items.sort(key=lambda t: t[0])
        images = np.stack([t[2] for t in items]).transpose(0, 3, 1, 2).copy()
        out[split] = RawSplit(images, np.array([t[1] for t in items], dtype=np.int64))
    return out


def _cached(key: str, produce: Callable[[], dict[str, RawSplit]]) -> dict[str, RawSplit]:
    path = cache_dir() / f"{key}.npz"
    if path.is_file():
        try:
            with np.load(path) as z:
                return {s: RawSplit(z[f"{s}_images"], z[f"{s}_labels"]) for s in ("train", "test")}
        except Exception:
            path.unlink(missing_ok=True)  # corrupt cache: decode again
    splits = produce()
    arrays = {f"{s}_{k}": getattr(r, k) for s, r in splits.items() for k in ("images", "labels")}
    atomic_write(path, lambda f: np.savez(f, **arrays))
    return splits


def _load_cifar_jpeg(tar_path: Path) -> dict[str, RawSplit]:
    st = tar_path.stat()
    key = hashlib.sha1(f"{tar_path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return _cached(f"cifar10-jpeg-{key}", lambda: _decode_cifar_jpeg_tar(tar_path))


def _unpickle(path: Path) -> dict:
    # torchvision's CIFAR python batches are pickles of numpy arrays, lists and strings;
    # read them with a restricted unpickler that allows only numpy's array reconstruction.
    import importlib
    import pickle
    import warnings

    allowed = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    class _NoGlobals(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) in allowed:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    return getattr(importlib.import_module(module), name)
            raise NetslimError(f"{path}: unexpected object {module}.{name} in a CIFAR batch file")

    with open(path, "rb") as f:
        return _NoGlobals(f, encoding="latin1").load()


def _load_cifar_python(d: Path, train_files: list[str], test_files: list[str], label_key: str) -> dict[str, RawSplit]:
    def read(files: list[str]) -> RawSplit:
        batches = [_unpickle(d / f) for f in files]
        images = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32).astype(np.uint8)
        labels = np.concatenate([np.asarray(b[label_key]) for b in batches]).astype(np.int64)
        return RawSplit(images, labels)

    return {"train": read(train_files), "test": read(test_files)}


# ---------------------------------------------------------------- locating
def _locate_mnist_like(root: Path, subdirs: tuple[str, ...]) -> Callable[[], dict[str, RawSplit]] | None:
    d = _find_idx_dir(root, subdirs)
    if d is None:
        return None
    return lambda: {s: _load_idx(d, s) for s in ("train", "test")}


def _locate_cifar10(root: Path) -> Callable[[], dict[str, RawSplit]] | None:
    for tar in (root / "cifar10" / "cifar10-jpeg.tar.gz", root / "cifar10-jpeg.tar.gz"):
        if tar.is_file():
            return lambda tar=tar: _load_cifar_jpeg(tar)
    for d in (root / "cifar-10-batches-py", root / "cifar10" / "cifar-10-batches-py"):
        if (d / "data_batch_1").is_file():
            train = [f"data_batch_{i}" for i in range(1, 6)]
            return lambda d=d: _load_cifar_python(d, train, ["test_batch"], "labels")
    return None


def _locate_cifar100(root: Path) -> Callable[[], dict[str, RawSplit]] | None:
    for d in (root / "cifar-100-python", root / "cifar100" / "cifar-100-python"):
        if (d / "train").is_file():
            return lambda d=d: _load_cifar_python(d, ["train"], ["test"], "fine_labels")
    return None


LOCATORS: dict[str, Callable[[Path], Callable[[], dict[str, RawSplit]] | None]] = {
    "mnist": lambda r: _locate_mnist_like(r, ("mnist", "MNIST/raw", "")),
    "fashion-mnist": lambda r: _locate_mnist_like(r, ("fashion-mnist", "FashionMNIST/raw", "fashion_mnist")),
    "cifar10": _locate_cifar10,
    "cifar100": _locate_cifar100,
}

_TORCHVISION_DOWNLOAD = {
    "mnist": ("MNIST", "MNIST/raw"),
    "fashion-mnist": ("FashionMNIST", "FashionMNIST/raw"),
    "cifar10": ("CIFAR10", ""),
    "cifar100": ("CIFAR100", ""),
}


def _try_download(name: str) -> Callable[[], dict[str, RawSplit]] | None:
    """torchvision's download into netslim's cache; None when there is no network."""
    if os.environ.get("NETSLIM_NO_DOWNLOAD"):
        return None
    import torchvision

    cls_name, _ = _TORCHVISION_DOWNLOAD[name]
    target = cache_dir() / "downloads"
    try:
        getattr(torchvision.datasets, cls_name)(str(target), train=False, download=True)
        getattr(torchvision.datasets, cls_name)(str(target), train=True, download=True)
    except Exception:
        return None
    return LOCATORS[name](target)


def load_raw(name: str, root: str | Path | None = None, allow_download: bool = True) -> dict[str, RawSplit]:
    """The train and test arrays of dataset ``name``, from the first place that has them."""
    roots = search_roots(root)
    for r in roots:
        loader = LOCATORS[name](r)
        if loader is not None:
            return loader()
    if allow_download:
        loader = _try_download(name)
        if loader is not None:
            return loader()
    places = ", ".join(str(r) for r in roots)
    hint = " (Debian: apt-get install dataset-fashion-mnist)" if name == "fashion-mnist" else ""
    raise NetslimError(f"dataset {name!r} not found; searched: {places}, then torchvision download{hint}")
