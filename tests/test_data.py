import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from netslim import NetslimError
from netslim import data as nsdata
from netslim.data.idx import read_idx


def write_idx(path, array, gz=True):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", s) for s in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def make_mnist_like(folder, n_train=20, n_test=10):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))


def test_idx_reader_roundtrip_and_truncation(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", arr)
    write_idx(tmp_path / "b", arr, gz=False)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), arr)
    assert np.array_equal(read_idx(tmp_path / "b"), arr)
    (tmp_path / "c").write_bytes((tmp_path / "b").read_bytes()[:-3])
    with pytest.raises(NetslimError, match="data bytes"):
        read_idx(tmp_path / "c")
    (tmp_path / "d").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(NetslimError, match="magic"):
        read_idx(tmp_path / "d")


def test_explicit_root_comes_first_and_normalization_applies(tmp_path):
    make_mnist_like(tmp_path / "fashion-mnist")
    ds = nsdata.get("fashion-mnist", "train", root=tmp_path)
    assert len(ds) == 20
    x, y = ds[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and 0 <= int(y) < 10
    raw = ds.images[0].float() / 255
    torch.testing.assert_close(x, (raw - 0.2860) / 0.3530)


def test_env_var_root(tmp_path, monkeypatch):
    make_mnist_like(tmp_path / "mnist", n_train=7)
    monkeypatch.setenv("NETSLIM_DATA", str(tmp_path))
    assert len(nsdata.get("mnist", "train")) == 7


def test_missing_dataset_lists_the_places_searched(tmp_path, monkeypatch):
    monkeypatch.setenv("NETSLIM_NO_DOWNLOAD", "1")
    monkeypatch.setenv("NETSLIM_SHARED", str(tmp_path / "nowhere"))
    monkeypatch.delenv("NETSLIM_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NetslimError) as err:
        nsdata.load_raw("cifar100", root=tmp_path / "mine")
    msg = str(err.value)
    assert "not found" in msg and str(tmp_path / "mine") in msg and "/usr/share/datasets" in msg


def test_unknown_dataset_and_split_are_clear_errors():
    with pytest.raises(NetslimError, match="valid datasets"):
        nsdata.get("imagenet21k")
    with pytest.raises(NetslimError, match="valid splits"):
        nsdata.get("mnist", "validation")


def test_torchvision_cifar_python_folder(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(1)
    for name, n in [(f"data_batch_{i}", 4) for i in range(1, 6)] + [("test_batch", 3)]:
        with open(d / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(range(n))}, f)
    train = nsdata.get("cifar10", "train", root=tmp_path, augment=True)
    test = nsdata.get("cifar10", "test", root=tmp_path)
    assert len(train) == 20 and len(test) == 3
    assert train[0][0].shape == (3, 32, 32)


def test_image_folder_tree(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (40, 30), (i * 100, 50, 50)).save(tmp_path / split / cls / f"{i}.png")
    test = nsdata.get(str(tmp_path), "test")
    assert len(test) == 4 and test[0][0].shape == (3, 224, 224)
    assert nsdata.info(str(tmp_path)).num_classes == 2


def test_calibration_split_is_a_fixed_subset(tmp_path):
    make_mnist_like(tmp_path / "mnist", n_train=50)
    a = nsdata.get("mnist", "calib", root=tmp_path, calib_size=16, seed=3)
    b = nsdata.get("mnist", "calib", root=tmp_path, calib_size=16, seed=3)
    assert len(a) == 16 and a.indices == b.indices


def test_cifar10_jpeg_tar_decodes_with_class_labels(shared):
    train = nsdata.get("cifar10", "train")
    test = nsdata.get("cifar10", "test")
    assert len(train) == 50_000 and len(test) == 10_000
    assert torch.bincount(test.labels, minlength=10).tolist() == [1000] * 10
    assert test.images.dtype == torch.uint8 and test.images.shape[1:] == (3, 32, 32)
    x, _ = train[0]
    assert x.shape == (3, 32, 32)


def test_cifar_augmentation_changes_images_but_not_labels(shared):
    aug = nsdata.get("cifar10", "train", augment=True)
    torch.manual_seed(0)
    views = [aug[5][0] for _ in range(6)]
    assert any(not torch.equal(views[0], v) for v in views[1:])


def test_mnist_from_shared_matches_the_original_files(shared):
    import hashlib

    test = nsdata.get("mnist", "test")
    assert len(test) == 10_000 and int(test.labels[0]) == 7
    raw = gzip.open(shared / "data" / "mnist" / "train-images-idx3-ubyte.gz").read()
    assert hashlib.md5(raw).hexdigest() == "6bbc9ace898e44ae57da46a324031adb"
