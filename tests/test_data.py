"""Tests for bilevel.data: real shared files (skipped when absent), fakes for the rest. No network."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
import socket
from pathlib import Path

import numpy as np
import pooch
import pytest
import torch

from bilevel import data as D

DATA = Path(os.environ.get("BILEVEL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
needs_data = pytest.mark.skipif(
    not (DATA / "uci").is_dir(),
    reason=f"shared benchmark data not found at {DATA} (set BILEVEL_DATA to the data folder)",
)

# README table: rows, feature count, Clarke train+val N, Gal train/test rows per split
UCI_TABLE = {
    "boston": (506, 13, 455, 455, 51),
    "concrete": (1030, 8, 927, 927, 103),
    "energy": (768, 8, 692, 691, 77),
    "kin8nm": (8192, 8, 7373, 7373, 819),
    "naval": (11934, 16, 10741, 10741, 1193),
    "power": (9568, 4, 8611, 8611, 957),
    "wine": (1599, 11, 1439, 1439, 160),
    "yacht": (308, 6, 277, 277, 31),
}
# Clarke et al.'s datasets.py slices (train + validation); mostly a 0.2 validation proportion, Energy ~80/10/10
CLARKE_TRAIN_VAL = {
    "boston": (364, 91),
    "concrete": (742, 185),
    "energy": (614, 78),
    "kin8nm": (5898, 1475),
    "naval": (8593, 2148),
    "power": (6889, 1722),
    "wine": (1151, 288),
    "yacht": (222, 55),
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("BILEVEL_DOWNLOAD", "0")


# ---------------------------------------------------------------- data dir, registry, errors


def test_data_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("BILEVEL_DATA", str(tmp_path / "env"))
    assert D.data_dir(tmp_path / "explicit") == tmp_path / "explicit"
    assert D.data_dir() == tmp_path / "env"
    monkeypatch.delenv("BILEVEL_DATA")
    assert D.data_dir() == Path("~/.cache/bilevel").expanduser()


def test_unknown_names_raise_listing_known():
    with pytest.raises(ValueError, match="known:.*energy.*mnist.*ptb.*digits"):
        D.load("not-a-dataset")
    with pytest.raises(ValueError, match="known: boston, concrete"):
        D.load_uci("protein")
    with pytest.raises(ValueError, match="diabetes, digits"):
        D.load_sklearn("iris")


def test_registry_and_aliases():
    assert {
        "boston",
        "energy",
        "naval",
        "yacht",
        "mnist",
        "fashion-mnist",
        "ptb",
        "cifar10",
        "diabetes",
        "digits",
    } <= set(D.DATASETS)
    for alias, canon in [
        ("bostonHousing", "boston"),
        ("wine-quality-red", "wine"),
        ("UCI_Naval", "naval"),
        ("power-plant", "power"),
        ("Fashion_MNIST", "fashion-mnist"),
        ("CIFAR-10", "cifar10"),
    ]:
        assert D.dataset_name(alias) == canon
    assert D.DATASETS["energy"].kind == "regression"


def test_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        D.load_uci("energy", data_dir=tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "uci" / "energy" / "data.txt") in msg and "BILEVEL_DATA" in msg and "--data-dir" in msg
    with pytest.raises(FileNotFoundError, match="mnist/train-images-idx3-ubyte.gz"):
        D.load_mnist(data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="ptb.train.txt"):
        D.load_ptb(data_dir=tmp_path, download=False)
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        D.load_cifar10(data_dir=tmp_path)


# ---------------------------------------------------------------- checksums and download


def test_download_file_url(tmp_path):
    src = tmp_path / "src.txt"
    src.write_bytes(b"hello bilevel\n")
    sha = hashlib.sha256(b"hello bilevel\n").hexdigest()
    out = D.download(src.as_uri(), tmp_path / "sub" / "dest.txt", known_hash="sha256:" + sha)
    assert out.read_bytes() == b"hello bilevel\n"
    with pytest.raises(ValueError, match="does not match the known hash: expected sha256:0000"):
        D.download(src.as_uri(), tmp_path / "bad.txt", known_hash="sha256:" + "0" * 64)
    with pytest.raises(ValueError, match="does not match the known hash"):  # into folders that do not exist yet
        D.download(src.as_uri(), tmp_path / "new" / "deep" / "bad.txt", known_hash="md5:" + "0" * 32)
    with pytest.raises(FileNotFoundError):
        D.download((tmp_path / "nonexistent.txt").as_uri(), tmp_path / "new" / "x.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.txt", "sub"]  # nothing left behind
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["dest.txt"]  # no temporary file either


def _refused_url(name: str) -> str:
    """An http URL on this machine where nothing listens: a download attempt fails at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


def test_failed_download_creates_nothing(tmp_path, monkeypatch):
    """No network (or a dead mirror): the error names the file and the URLs tried, and no folder is created."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    root = tmp_path / "data"
    urls = [_refused_url("ptb.test.txt"), (tmp_path / "nonexistent" / "ptb.test.txt").as_uri()]
    with pytest.raises(FileNotFoundError) as e:
        D.fetch("ptb/ptb.test.txt", root, urls=urls, download_if_missing=True)
    msg = str(e.value)
    assert "download failed" in msg and all(u in msg for u in urls) and str(root / "ptb" / "ptb.test.txt") in msg
    assert "\n" not in msg
    from bilevel.data import ptb

    monkeypatch.setattr(ptb, "PTB_URLS", [_refused_url("{file}")])
    monkeypatch.setenv("BILEVEL_DOWNLOAD", "1")  # the loaders' default: download when missing
    with pytest.raises(FileNotFoundError, match="ptb.train.txt.*download failed"):
        D.load_ptb(data_dir=root)
    assert sorted(tmp_path.iterdir()) == []


def test_fetch_over_http_with_pooch(tmp_path, monkeypatch):
    """The real download path: pooch's HTTP downloader (progress bar on) against a local server, hash-checked."""
    import functools
    import http.server
    import threading

    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    served = tmp_path / "served"
    served.mkdir()
    (served / "hello.txt").write_bytes(b"hello over http\n")
    (served / "other.txt").write_bytes(b"something else\n")
    sha = "sha256:" + hashlib.sha256(b"hello over http\n").hexdigest()
    for key in ("toy/hello.txt", "toy/other.txt"):
        monkeypatch.setitem(D.REGISTRY, key, sha)
        monkeypatch.setitem(D.CHECKSUMS, key, (sha,))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        root = tmp_path / "data"
        path = D.fetch(
            "toy/hello.txt", root, urls=[f"{base}/missing.txt", f"{base}/hello.txt"], download_if_missing=True
        )
        assert path == root / "toy" / "hello.txt" and path.read_bytes() == b"hello over http\n"
        # served content that does not match the registry: rejected, nothing written
        with pytest.raises(FileNotFoundError, match="does not match the known hash"):
            D.fetch("toy/other.txt", root, urls=[f"{base}/other.txt"], download_if_missing=True)
        assert sorted(p.name for p in (root / "toy").iterdir()) == ["hello.txt"]
    finally:
        server.shutdown()
        server.server_close()


@needs_data
def test_fetch_downloads_missing_file_and_verifies(tmp_path):
    key = "ptb/ptb.valid.txt"
    url = (DATA / key).as_uri()
    path = D.fetch(key, tmp_path, urls=["file:///nonexistent/ptb.valid.txt", url], download_if_missing=True)
    assert path == tmp_path / key and D.file_digest(path) == D.CHECKSUMS[key][0].split(":")[1]
    assert D.REGISTRY[key] == D.CHECKSUMS[key][0]
    # a source with the wrong content is rejected and the file is not created
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("not ptb\n")
    with pytest.raises(
        FileNotFoundError, match="does not match the known hash: expected " + D.REGISTRY["ptb/ptb.test.txt"]
    ):
        D.fetch("ptb/ptb.test.txt", tmp_path, urls=[wrong.as_uri()], download_if_missing=True)
    assert not (tmp_path / "ptb" / "ptb.test.txt").exists()


@needs_data
def test_checksum_mismatch_raises_naming_file(tmp_path):
    src = DATA / "uci" / "energy"
    dst = tmp_path / "uci" / "energy"
    shutil.copytree(src, dst)
    shutil.copytree(DATA / "uci_clarke2022_permutations", tmp_path / "uci_clarke2022_permutations")
    os.chmod(dst, 0o755)
    (dst / "data.txt").chmod(0o644)
    assert D.load_uci("energy", data_dir=tmp_path).sizes == (615, 77, 76)
    with open(dst / "data.txt", "a") as f:
        f.write("1 2 3 4 5 6 7 8 9\n")
    with pytest.raises(ValueError, match=r"checksum mismatch.*uci/energy/data.txt"):
        D.load_uci("energy", data_dir=tmp_path)


@needs_data
def test_mnist_checksums_verified_and_cached(monkeypatch):
    for f in ("train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        key = f"mnist/{f}"
        assert D.CHECKSUMS[key][0] == "sha256:" + D.file_digest(DATA / key)
        assert D.verify(DATA / key, key) is True
    # the recompressed train images also accept the original .gz's published MD5
    assert "md5:f68b3c2dcbeaaa9fbdd348bbdeb94873" in D.CHECKSUMS["mnist/train-images-idx3-ubyte.gz"]
    # wrong expected digest -> ValueError naming the file
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz"):
        D.verify(DATA / "mnist/t10k-labels-idx1-ubyte.gz", accepted=["sha256:" + "1" * 64])
    # the registry (what pooch checks a download against) has the official file's MD5
    assert D.REGISTRY["mnist/train-images-idx3-ubyte.gz"] == "md5:f68b3c2dcbeaaa9fbdd348bbdeb94873"
    # cached: a second verification does not hash again
    calls = []
    monkeypatch.setattr(pooch, "file_hash", lambda *a, **k: calls.append(a) or "")
    D.verify(DATA / "mnist/train-images-idx3-ubyte.gz", "mnist/train-images-idx3-ubyte.gz")
    assert calls == []
    assert D.verify(DATA / "README.md", "README.md") is False  # unknown file: nothing checked


# ---------------------------------------------------------------- UCI


@needs_data
@pytest.mark.parametrize("name", list(UCI_TABLE))
def test_uci_clarke_protocol(name):
    rows, nfeat, n_tv, _, _ = UCI_TABLE[name]
    raw = D.load_uci_raw(name, data_dir=DATA)
    assert len(raw) == rows
    d = D.load_uci(name, data_dir=DATA)
    n_val = n_tv - int(np.rint(n_tv * 8 / 9))
    assert d.sizes == (n_tv - n_val, n_val, rows - n_tv)
    assert d.X_train.shape[1] == nfeat and d.y_train.shape == (n_tv - n_val, 1)
    assert d.X_train.dtype == torch.float32
    std = d.X_train.std(0)
    varying = std > 0  # constant columns (naval 8 and 11) are guarded: they become 0, never NaN
    assert torch.nonzero(~varying).flatten().tolist() == ([8, 11] if name == "naval" else [])
    assert torch.allclose(d.X_test[:, ~varying], torch.zeros(1), atol=1e-6)
    assert torch.allclose(d.X_train.mean(0), torch.zeros(nfeat), atol=1e-5)
    assert torch.allclose(std[varying], torch.ones(int(varying.sum())), atol=1e-4)
    assert abs(float(d.y_train.mean())) < 1e-5 and abs(float(d.y_train.std()) - 1) < 1e-4
    assert all(torch.isfinite(t).all() for t in (d.X_train, d.X_val, d.X_test, d.y_test))
    # test rows are exactly data[perm][N:], target = last column (naval: after dropping its last column)
    perm = np.loadtxt(
        DATA / "uci_clarke2022_permutations" / f"UCI_{D.UCI_DATASETS[name][1]}_permutation_indices.txt", dtype=int
    )
    data = raw[:, :-1] if name == "naval" else raw
    expect = torch.tensor(data[perm][n_tv:, -1:], dtype=torch.float32)
    assert torch.allclose(d.unnormalise_y(d.y_test), expect, rtol=1e-5, atol=1e-4)
    # Clarke et al.'s own train/validation sizes (datasets.py) come out of the same np.rint rule
    n_tr, n_va = CLARKE_TRAIN_VAL[name]
    assert D.load_uci(name, data_dir=DATA, val_fraction=n_va / (n_tr + n_va)).sizes == (n_tr, n_va, rows - n_tv)


@needs_data
def test_uci_energy_numbers_and_options():
    d = D.load_uci("energy", data_dir=DATA)
    assert d.metadata["n_trainval"] == 692 and d.sizes == (615, 77, 76)
    m = d.merged()
    assert m.sizes == (692, 0, 76) and torch.equal(m.X_train, d.X_trainval)
    assert torch.equal(D.load("energy", data_dir=DATA).X_test, d.X_test)
    assert D.load_uci("wine-quality-red", data_dir=DATA).sizes == D.load_uci("wine", data_dir=DATA).sizes
    # split fractions are arguments (Clarke Table 14 varies them)
    v = D.load_uci("energy", data_dir=DATA, val_fraction=0.25, test_fraction=0.2)
    assert v.sizes == (460, 154, 154)  # 154 test rows; rint(614 * 0.75) = 460 train
    # Clarke's code normalises with train+val statistics
    tv = D.load_uci("energy", data_dir=DATA, normalise="train_val")
    assert torch.allclose(tv.X_trainval.mean(0), torch.zeros(8), atol=1e-5)
    raw = D.load_uci("energy", data_dir=DATA, normalise=False, dtype=torch.float64)
    assert raw.x_mean is None and float(raw.y_train.min()) > 5  # heating load in original units


@needs_data
@pytest.mark.parametrize("name", ["boston", "naval", "yacht"])
def test_uci_gal_protocol(name):
    rows, nfeat, _, n_tr, n_te = UCI_TABLE[name]
    d = D.load_uci(name, data_dir=DATA, split="gal", split_index=7)
    n_val = n_tr - int(np.rint(n_tr * 8 / 9))
    assert d.sizes == (n_tr - n_val, n_val, n_te) and d.X_train.shape[1] == nfeat
    tr, te = d.metadata["train_index"], d.metadata["test_index"]
    assert set(tr).isdisjoint(te) and len(set(tr) | set(te)) == rows
    assert abs(float(d.y_train.std()) - 1) < 1e-4
    with pytest.raises(ValueError, match="split_index"):
        D.load_uci(name, data_dir=DATA, split="gal", split_index=20)
    with pytest.raises(ValueError, match="split protocol"):
        D.load_uci(name, data_dir=DATA, split="random")


# ---------------------------------------------------------------- MNIST / Fashion-MNIST


def test_parse_idx_roundtrip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 8, 3]) + np.array(arr.shape, dtype=">u4").tobytes() + arr.tobytes()
    assert np.array_equal(D.parse_idx(raw), arr)
    p = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(p, "wb") as f:
        f.write(raw)
    assert np.array_equal(D.read_idx(p), arr)
    with pytest.raises(ValueError, match="magic"):
        D.parse_idx(b"\x01\x02\x08\x01")
    with pytest.raises(ValueError, match="size"):
        D.parse_idx(raw[:-1])


@needs_data
def test_mnist_real_files():
    Xtr, ytr, Xte, yte = D.load_mnist(data_dir=DATA)
    assert Xtr.shape == (60000, 28, 28) and Xte.shape == (10000, 28, 28) and Xtr.dtype == torch.uint8
    assert ytr.dtype == torch.int64 and int(ytr.min()) == 0 and int(ytr.max()) == 9
    assert ytr.bincount().tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert yte.bincount().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert int(Xtr.max()) == 255 and int(Xtr.min()) == 0
    # decompressed content equals the published MD5 of the original uncompressed idx file
    with gzip.open(DATA / "mnist" / "train-images-idx3-ubyte.gz") as f:
        assert hashlib.md5(f.read()).hexdigest() == "6bbc9ace898e44ae57da46a324031adb"

    s = D.image_splits(Xtr, ytr, Xte, yte)
    assert s.sizes == (42000, 14000, 14000) and s.X_train.shape == (42000, 784) and s.num_classes == 10
    assert float(s.X_train.max()) == 1.0 and float(s.X_train.min()) == 0.0
    s2 = D.image_splits(Xtr, ytr, Xte, yte, flatten=False, seed=0)
    assert s2.X_val.shape == (14000, 1, 28, 28) and torch.equal(s2.y_test, s.y_test)
    assert not torch.equal(D.image_splits(Xtr, ytr, Xte, yte, seed=1).y_test, s.y_test)
    k = D.image_splits(Xtr, ytr, Xte, yte, fractions=None, val_fraction=1 / 6)
    assert k.sizes == (50000, 10000, 10000) and torch.equal(k.y_test, yte)


@needs_data
def test_fashion_mnist_real_files():
    Xtr, ytr, Xte, yte = D.load_mnist(data_dir=DATA, fashion=True)
    assert Xtr.shape == (60000, 28, 28) and Xte.shape == (10000, 28, 28)
    assert ytr.bincount().tolist() == [6000] * 10 and yte.bincount().tolist() == [1000] * 10
    d = D.load("fashion-mnist", data_dir=DATA)
    assert d.sizes == (42000, 14000, 14000) and d.metadata["name"] == "fashion-mnist"


# ---------------------------------------------------------------- PTB


@needs_data
def test_ptb_counts_and_batching():
    c = D.load_ptb(data_dir=DATA)
    assert len(c.dictionary) == 10000 and c.ntokens == 10000
    assert "<eos>" in c.vocab and "<unk>" in c.vocab and "N" in c.vocab
    assert (len(c.train), len(c.valid), len(c.test)) == (929589, 73760, 82430)
    assert len(c.train) + len(c.valid) == 1003349
    eos = c.vocab["<eos>"]
    assert int((c.train == eos).sum()) == 42068 and int((c.test == eos).sum()) == 3761
    assert c.train.dtype == torch.int64 and int(c.train.max()) == 9999
    with open(DATA / "ptb" / "ptb.valid.txt") as f:
        first = f.readline().split()
    assert c.decode(c.valid[: len(first) + 1]) == first + ["<eos>"]

    b = D.batchify(c.train, 20)
    assert b.shape == (929589 // 20, 20)
    assert torch.equal(b[:, 1], c.train[46479 : 2 * 46479])  # column j = j-th contiguous chunk
    x, y = D.get_batch(b, 0, 35)
    assert x.shape == (35, 20) and y.shape == (700,) and torch.equal(y.view(35, 20)[:-1], x[1:])
    x, y = D.get_batch(b, len(b) - 5, 35, flatten_target=False)
    assert x.shape == (4, 20) and y.shape == (4, 20)


def test_batchify_small():
    ids = torch.arange(26)
    b = D.batchify(ids, 4)
    assert b.shape == (6, 4) and b[:, 0].tolist() == [0, 1, 2, 3, 4, 5] and b[0].tolist() == [0, 6, 12, 18]
    x, y = D.get_batch(b, 2, 3)
    assert x.tolist() == b[2:5].tolist() and y.tolist() == b[3:6].reshape(-1).tolist()


# ---------------------------------------------------------------- CIFAR-10 (fake batches)


def _write_batches(folder: Path, sizes: dict, label_key: bytes, label, seed: int = 0) -> None:
    """Pickled CIFAR-style batches ``{name: n}`` with uint8 ``data`` (n, 3072) and ``label(i, j)`` labels."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i, (name, n) in enumerate(sizes.items()):
        batch = {
            b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            label_key: [label(i, j) for j in range(n)],
            b"batch_label": name.encode(),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


def _fake_cifar(root: Path, n: int = 4) -> None:
    names = [*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]
    _write_batches(root / "cifar-10-batches-py", dict.fromkeys(names, n), b"labels", lambda i, j: (i + j) % 10)


def test_cifar10_fake_batches(tmp_path):
    _fake_cifar(tmp_path)
    Xtr, ytr, Xte, yte = D.load_cifar10(data_dir=tmp_path)
    assert Xtr.shape == (20, 3, 32, 32) and Xte.shape == (4, 3, 32, 32) and Xtr.dtype == torch.uint8
    assert ytr.tolist()[:8] == [0, 1, 2, 3, 1, 2, 3, 4] and yte.tolist() == [5, 6, 7, 8]
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        first = pickle.load(f)[b"data"][0]
    assert np.array_equal(Xtr[0].numpy().reshape(-1), first)  # channel-major 3x32x32 layout
    s = D.load("cifar10", data_dir=tmp_path, val_fraction=0.25, flatten=False)
    assert s.sizes == (15, 5, 4) and s.X_train.shape[1:] == (3, 32, 32) and float(s.X_train.max()) <= 1.0


def test_cifar10_download_and_extract_file_url(tmp_path, monkeypatch):
    import tarfile

    from bilevel.data import cifar

    _fake_cifar(tmp_path / "src", n=2)
    archive = tmp_path / "fake-cifar.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setattr(cifar, "CIFAR10_URL", archive.as_uri())
    md5 = "md5:" + D.file_digest(archive, "md5")
    monkeypatch.setitem(D.REGISTRY, "cifar-10-python.tar.gz", md5)
    monkeypatch.setitem(D.CHECKSUMS, "cifar-10-python.tar.gz", (md5,))
    root = tmp_path / "data"
    Xtr, ytr, Xte, yte = D.load_cifar10(data_dir=root, download=True)
    assert Xtr.shape == (10, 3, 32, 32) and yte.shape == (2,)
    assert (root / "cifar-10-python.tar.gz").exists() and (root / "cifar-10-batches-py" / "test_batch").exists()


def test_cifar10_bad_tarball_rejected(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not the real archive")
    with pytest.raises(ValueError, match="cifar-10-python.tar.gz"):
        D.load_cifar10(data_dir=tmp_path)


def _fake_cifar100(root: Path, n_train: int = 6, n_test: int = 3) -> None:
    _write_batches(
        root / "cifar-100-python",
        {"train": n_train, "test": n_test},
        b"fine_labels",
        lambda i, j: (7 * j) % 100,
        seed=1,
    )


def test_cifar100_fake_batches_fine_labels_and_errors(tmp_path):
    _fake_cifar100(tmp_path)
    Xtr, ytr, Xte, yte = D.load_cifar100(data_dir=tmp_path)
    assert Xtr.shape == (6, 3, 32, 32) and Xte.shape == (3, 3, 32, 32) and Xtr.dtype == torch.uint8
    assert ytr.tolist() == [0, 7, 14, 21, 28, 35] and yte.tolist() == [0, 7, 14]  # fine, not coarse labels
    with open(tmp_path / "cifar-100-python" / "train", "rb") as f:
        assert np.array_equal(Xtr[1].numpy().reshape(-1), pickle.load(f)[b"data"][1])
    assert D.dataset_name("CIFAR-100") == "cifar100"
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        D.load_cifar100(data_dir=tmp_path / "empty", download=False)
    with pytest.raises(ValueError, match="CIFAR-10 batch"):  # a CIFAR-100 file read as CIFAR-10 names the problem
        from bilevel.data.cifar import _read_batch

        _read_batch(tmp_path / "cifar-100-python" / "train")


# ---------------------------------------------------------------- scikit-learn toys


def test_sklearn_diabetes_and_digits():
    d = D.load_sklearn("diabetes")
    assert d.sizes == (266, 88, 88) and d.X_train.shape[1] == 10 and d.y_train.shape == (266, 1)
    assert torch.allclose(d.X_train.mean(0), torch.zeros(10), atol=1e-5)
    assert torch.allclose(d.X_train.std(0), torch.ones(10), atol=1e-4)
    assert torch.equal(D.load("diabetes").y_test, d.y_test)  # seeded, deterministic
    assert not torch.equal(D.load_sklearn("diabetes", seed=1).y_test, d.y_test)
    g = D.load_sklearn("digits", fractions=(0.8, 0.1, 0.1))
    assert g.sizes == (1437, 180, 180) and g.X_train.shape[1] == 64 and g.num_classes == 10
    assert g.y_train.dtype == torch.int64 and float(g.X_train.max()) == 1.0
