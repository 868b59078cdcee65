"""The dataset loaders on small files written here in each official format (IDX, MATLAB v5 .mat,
CIFAR-10 pickles and .tar.gz, a CelebA JPEG folder): exact pixels, shapes, ranges, padding, label
mapping, and a clear error naming the file for every missing, truncated or malformed one; the TF1
bicubic resize; device-resident batches (seeded, resumable, every image once per epoch)."""
import gzip
import io
import math
import pickle
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from acai_fast.data import (DATASETS, DeviceBatches, data_folder, load_dataset, load_pixels,
                            resize_bicubic, to_unit_range)
from acai_fast.data.celeba import bicubic_weights, prepare_celeba
from helpers import write_idx, write_jpegs, write_svhn


def scaled(pixels):
    """The paper's scaling, written with numpy: float32(x) * (2/255) - 1."""
    return np.asarray(pixels).astype(np.float32) * np.float32(2.0 / 255) - np.float32(1.0)


# ---------------------------------------------------------------- MNIST / Fashion-MNIST (IDX)
@pytest.mark.parametrize("name, compress", [("mnist", True), ("fashion_mnist", False)])
def test_idx_pixels_padding_labels(tmp_path, name, compress):
    rng = np.random.default_rng(0)
    images, labels = write_idx(tmp_path, "t10k", 7, rng, compress)
    x, y = load_dataset(name, tmp_path, "test")
    assert x.shape == (7, 1, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.tolist() == labels.tolist()
    np.testing.assert_array_equal(x[:, 0, 2:30, 2:30].numpy(), scaled(images))
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (x[:, 0][:, border] == -1).all()  # 2 pixels of -1 on every side
    assert x.min() >= -1 and x.max() <= 1
    pixels, _ = load_pixels(name, tmp_path, "test", limit=3)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 1, 32, 32)
    assert torch.equal(to_unit_range(pixels), x[:3])


def test_idx_found_in_dataset_subfolder(tmp_path):
    rng = np.random.default_rng(1)
    _, labels = write_idx(tmp_path / "fashion-mnist", "train", 5, rng)
    write_idx(tmp_path / "mnist", "train", 4, rng)
    assert load_dataset("fashion_mnist", tmp_path, "train")[1].tolist() == labels.tolist()
    assert load_dataset("mnist", tmp_path, "train")[0].shape[0] == 4


def test_idx_errors_name_the_file(tmp_path):
    rng = np.random.default_rng(2)
    write_idx(tmp_path, "train", 6, rng)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    good = gzip.decompress(path.read_bytes())

    with gzip.open(path, "wb") as f:  # a cut-off payload
        f.write(good[:-100])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz: truncated .*promises 4704 values, found 4604"):
        load_dataset("mnist", tmp_path)
    path.write_bytes(gzip.compress(good)[:50])  # a cut-off .gz stream
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz: cannot be decompressed.*official .* MD5 f68b3c2d"):
        load_dataset("mnist", tmp_path)
    with gzip.open(path, "wb") as f:  # a labels file where images belong
        f.write(b"\x00\x00\x08\x01" + good[4:])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz: not an IDX file .*0x00000801, expected 0x00000803"):
        load_dataset("mnist", tmp_path)
    path.unlink()
    with pytest.raises(FileNotFoundError, match=r"missing train-images-idx3-ubyte\.gz or train-images-idx3-ubyte"):
        load_dataset("mnist", tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("mnist", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="split must be one of"):
        load_dataset("mnist", tmp_path, "validation")
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet", tmp_path)


def test_verify_compares_official_md5(tmp_path):
    write_idx(tmp_path, "t10k", 3, np.random.default_rng(3))
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz: MD5 [0-9a-f]{32} does not match the official"):
        load_dataset("mnist", tmp_path, "test", verify=True)


# ---------------------------------------------------------------- SVHN (.mat)
def test_svhn_train_is_train_plus_extra(tmp_path):
    rng = np.random.default_rng(4)
    x_tr, y_tr = write_svhn(tmp_path, "train_32x32.mat", 5, rng)
    x_ex, y_ex = write_svhn(tmp_path, "extra_32x32.mat", 3, rng)
    x_te, y_te = write_svhn(tmp_path, "test_32x32.mat", 4, rng)
    x, y = load_dataset("svhn", tmp_path, "train")
    assert x.shape == (8, 3, 32, 32)
    raw = np.concatenate([x_tr, x_ex], axis=3)
    for n in range(8):  # X[row, column, channel, n] -> image n, channel, row, column
        np.testing.assert_array_equal(x[n].numpy(), scaled(raw[..., n].transpose(2, 0, 1)))
    assert y.tolist() == [d % 10 for d in np.concatenate([y_tr, y_ex])]
    assert y[0] == 0 and y[5] == 0  # label 10 is the digit 0
    pixels, y_test = load_pixels("svhn", tmp_path, "test")
    assert pixels.dtype == torch.uint8 and torch.equal(pixels[2], torch.from_numpy(x_te[..., 2].transpose(2, 0, 1).copy()))
    assert y_test.tolist() == [d % 10 for d in y_te]

    (tmp_path / "extra_32x32.mat").unlink()
    assert load_pixels("svhn", tmp_path, "train", limit=5)[0].shape[0] == 5  # extra not needed
    with pytest.raises(FileNotFoundError, match=r"missing extra_32x32\.mat .*531131 images.*a93ce644"):
        load_dataset("svhn", tmp_path, "train")


def test_svhn_errors_name_the_file(tmp_path):
    import scipy.io

    rng = np.random.default_rng(5)
    write_svhn(tmp_path, "test_32x32.mat", 4, rng)
    path = tmp_path / "test_32x32.mat"
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"test_32x32\.mat: not a readable MATLAB v5 file.*MD5 eb5a983b"):
        load_dataset("svhn", tmp_path, "test")
    path.write_bytes(b"this is not a MATLAB file at all" * 8)
    with pytest.raises(ValueError, match=r"test_32x32\.mat: not a readable MATLAB v5 file"):
        load_dataset("svhn", tmp_path, "test")
    scipy.io.savemat(path, {"X": np.zeros((28, 28, 1, 2), np.uint8), "y": np.ones((2, 1))})
    with pytest.raises(ValueError, match=r"test_32x32\.mat: X must be \(32, 32, 3, N\) uint8, found \(28, 28, 1, 2\)"):
        load_dataset("svhn", tmp_path, "test")
    scipy.io.savemat(path, {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[0], [3]])})
    with pytest.raises(ValueError, match=r"labels must be integers 1\.\.10"):
        load_dataset("svhn", tmp_path, "test")
    scipy.io.savemat(path, {"images": np.zeros((32, 32, 3, 2), np.uint8)})
    with pytest.raises(ValueError, match=r"expected variables X and y, found \['images'\]"):
        load_dataset("svhn", tmp_path, "test")


# ---------------------------------------------------------------- CIFAR-10 (pickles, .tar.gz)
def cifar_batch(n, rng):
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=n)]
    return {b"batch_label": b"testing", b"labels": labels, b"data": data,
            b"filenames": [b"x.png"] * n}


def write_cifar(folder, rng, sizes=(3, 2, 2, 2, 2, 4), archive=False):
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    batches = {name: cifar_batch(n, rng) for name, n in zip(names, sizes)}
    if archive:
        with tarfile.open(folder / "cifar-10-python.tar.gz", "w:gz") as tar:
            for name, batch in batches.items():
                raw = pickle.dumps(batch, protocol=2)
                info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
                info.size = len(raw)
                tar.addfile(info, io.BytesIO(raw))
    else:
        sub = folder / "cifar-10-batches-py"
        sub.mkdir(parents=True)
        for name, batch in batches.items():
            (sub / name).write_bytes(pickle.dumps(batch, protocol=2))
    return batches


@pytest.mark.parametrize("archive", [False, True], ids=["folder", "tar.gz"])
def test_cifar10_pixels_and_labels(tmp_path, archive):
    batches = write_cifar(tmp_path, np.random.default_rng(6), archive=archive)
    x, y = load_dataset("cifar10", tmp_path, "train")
    assert x.shape == (11, 3, 32, 32) and y.dtype == torch.int64
    rows = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    assert y.tolist() == sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    # row = 1024 red, 1024 green, 1024 blue values, each image row-major
    row = rows[7]
    assert x[7, 1, 2, 5] == scaled(row[1024 + 2 * 32 + 5])
    np.testing.assert_array_equal(x.numpy(), scaled(rows.reshape(11, 3, 32, 32)))
    x_test, y_test = load_pixels("cifar10", tmp_path, "test")
    assert x_test.dtype == torch.uint8 and x_test.shape == (4, 3, 32, 32)
    assert y_test.tolist() == batches["test_batch"][b"labels"]


def test_cifar10_errors_name_the_file(tmp_path):
    write_cifar(tmp_path, np.random.default_rng(7))
    sub = tmp_path / "cifar-10-batches-py"
    good = (sub / "data_batch_2").read_bytes()
    (sub / "data_batch_2").write_bytes(good[:200])
    with pytest.raises(ValueError, match=r"data_batch_2: not a readable CIFAR-10 python batch.*MD5 d4bba439"):
        load_dataset("cifar10", tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    (sub / "data_batch_2").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(ValueError, match=r"data_batch_2: .*refusing to load builtins\.print"):
        load_dataset("cifar10", tmp_path)
    (sub / "data_batch_2").write_bytes(pickle.dumps({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(ValueError, match=r"data_batch_2: b'data' must be \(N, 3072\) uint8 .*found \(2, 1024\)"):
        load_dataset("cifar10", tmp_path)
    (sub / "data_batch_2").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}))
    with pytest.raises(ValueError, match=r"data_batch_2: labels must lie in \[0, 10\)"):
        load_dataset("cifar10", tmp_path)
    (sub / "data_batch_2").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing CIFAR-10 batch file\(s\) data_batch_2 .*cifar-10-python\.tar\.gz"):
        load_dataset("cifar10", tmp_path)

    archive_dir = tmp_path / "archive"
    archive_dir.mkdir()
    write_cifar(archive_dir, np.random.default_rng(8), archive=True)
    archive = archive_dir / "cifar-10-python.tar.gz"
    archive.write_bytes(archive.read_bytes()[:300])
    with pytest.raises(ValueError, match=r"cifar-10-python\.tar\.gz: .*MD5 c58f3010"):
        load_dataset("cifar10", archive_dir)


# ---------------------------------------------------------------- CelebA (JPEG folder) and the resize
def tf1_bicubic_scalar(image, out_h, out_w):
    """TF1 resize_bicubic (align_corners=False, half_pixel_centers=False), one output pixel at a
    time, restated from its definition: position o * in/out, Keys' cubic a = -0.75 on the 4 nearest
    pixels (edge pixels repeated), the fraction rounded to 1/1024 (TF's weight table)."""
    def w(t, a=-0.75):
        t = abs(t)
        if t <= 1:
            return ((a + 2) * t - (a + 3)) * t * t + 1
        return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a if t < 2 else 0.0

    c, h, wd = image.shape
    out = np.zeros((c, out_h, out_w))
    for i in range(out_h):
        pi = i * np.float32(np.float32(h) / np.float32(out_h))
        bi = math.floor(pi)
        di = round((pi - bi) * 1024) / 1024
        for j in range(out_w):
            pj = j * np.float32(np.float32(wd) / np.float32(out_w))
            bj = math.floor(pj)
            dj = round((pj - bj) * 1024) / 1024
            for ti in (-1, 0, 1, 2):
                for tj in (-1, 0, 1, 2):
                    r = min(max(bi + ti, 0), h - 1)
                    s = min(max(bj + tj, 0), wd - 1)
                    out[:, i, j] += w(di - ti) * w(dj - tj) * image[:, r, s]
    return out


def test_resize_bicubic_tf1_and_half_pixel():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 2, 146, 146, generator=g, dtype=torch.float64) * 2 - 1
    got = resize_bicubic(x, (32, 32))
    np.testing.assert_allclose(got[0].numpy(), tf1_bicubic_scalar(x[0].numpy(), 32, 32), atol=1e-12)
    odd = torch.rand(2, 3, 23, 17, generator=g, dtype=torch.float64)
    np.testing.assert_allclose(resize_bicubic(odd, (9, 40))[1].numpy(), tf1_bicubic_scalar(odd[1].numpy(), 9, 40),
                               atol=1e-12)
    # The same machinery with half-pixel centres is PyTorch's bicubic, up and down.
    for size in ((32, 32), (50, 7)):
        torch.testing.assert_close(resize_bicubic(odd, size, "half_pixel"),
                                   F.interpolate(odd, size=size, mode="bicubic", align_corners=False))
    # Weights sum to 1 (a constant stays constant); 146 -> 32 samples input rows 0, 4.5625, ...
    assert np.allclose(bicubic_weights(146, 32).sum(1), 1)
    assert bicubic_weights(146, 32)[0, 0] == 1 and bicubic_weights(146, 32)[16, 73] == 1
    with pytest.raises(ValueError, match="coordinates"):
        bicubic_weights(146, 32, "align_corners")


def test_celeba_crop_and_resize(tmp_path):
    from PIL import Image

    write_jpegs(tmp_path / "img_align_celeba", 3, np.random.default_rng(9))
    x, labels = load_dataset("celeba", tmp_path, "train", progress=False)
    assert labels is None and x.shape == (3, 3, 32, 32) and x.dtype == torch.float32
    for i in range(3):
        decoded = np.asarray(Image.open(tmp_path / "img_align_celeba" / f"{i + 1:06d}.jpg"))  # (218, 178, 3)
        crop = scaled(decoded).transpose(2, 0, 1)[:, 36:182, 16:162]  # 36 rows off top/bottom, 16 columns off each side
        assert crop.shape == (3, 146, 146)
        expected = tf1_bicubic_scalar(crop.astype(np.float64), 32, 32)
        np.testing.assert_allclose(x[i].numpy(), expected.clip(-1, 1), atol=2e-6)  # clipped by default
        if i == 0:
            raw = prepare_celeba(torch.from_numpy(decoded.copy()).permute(2, 0, 1)[None], clip=False)[0]
            np.testing.assert_allclose(raw.numpy(), expected, atol=2e-6)  # the paper's unclipped values
            assert raw.abs().max() > 1  # (noise overshoots: the clip matters here)
    assert torch.equal(load_dataset("celeba", tmp_path / "img_align_celeba", "test", limit=2, progress=False)[0], x[:2])
    with pytest.raises(ValueError, match=r"expected \(N, 3, 218, 178\)"):
        prepare_celeba(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_celeba_errors_name_the_file(tmp_path):
    from PIL import Image

    folder = tmp_path / "img_align_celeba"
    write_jpegs(folder, 2, np.random.default_rng(10))
    good = (folder / "000002.jpg").read_bytes()
    (folder / "000002.jpg").write_bytes(good[: len(good) // 3])
    with pytest.raises(ValueError, match=r"000002\.jpg: not a readable JPEG.*truncated"):
        load_dataset("celeba", tmp_path, progress=False)
    Image.new("RGB", (64, 64)).save(folder / "000002.jpg", format="JPEG")
    with pytest.raises(ValueError, match=r"000002\.jpg: 64x64 RGB, expected a 178x218 RGB JPEG"):
        load_dataset("celeba", tmp_path, progress=False)
    Image.new("RGB", (178, 218)).save(folder / "000002.jpg", format="PNG")
    with pytest.raises(ValueError, match=r"000002\.jpg: a PNG image, expected a JPEG"):
        load_dataset("celeba", tmp_path, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no img_align_celeba/ folder of JPEGs .*202,599 files"):
        load_dataset("celeba", tmp_path / "empty", progress=False)


# ---------------------------------------------------------------- device-resident batches
def indexed_pixels(n):
    """Image i has every pixel = i (uint8), so a batch names the images it holds."""
    return torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 32, 32).contiguous()


def test_device_batches_epochs_seed_and_resume():
    n, batch = 50, 8
    pixels, labels = indexed_pixels(n), torch.arange(n) % 10
    stream = DeviceBatches(pixels, labels, batch=batch, seed=3)
    assert stream.steps_per_epoch == 6
    batches = [next(stream) for _ in range(13)]
    for x, y in batches:
        assert x.dtype == torch.float32 and x.shape == (batch, 1, 32, 32)
        ids = torch.round((x[:, 0, 0, 0] + 1) * 255 / 2).long()
        assert torch.equal(to_unit_range(pixels[ids]), x)  # uint8 -> [-1, 1] as the paper
        assert torch.equal(y, ids % 10)  # labels travel with their images
    for epoch in (0, 1):  # each epoch: 6 batches of distinct images, the last 2 dropped
        ids = torch.cat([torch.round((x[:, 0, 0, 0] + 1) * 127.5).long() for x, _ in batches[6 * epoch:6 * epoch + 6]])
        assert len(set(ids.tolist())) == 48
    assert not torch.equal(batches[0][1], batches[6][1])  # reshuffled every epoch
    again = DeviceBatches(pixels, labels, batch=batch, seed=3)
    assert all(torch.equal(next(again)[0], x) for x, _ in batches)  # seeded
    resumed = DeviceBatches(pixels, labels, batch=batch, seed=3, start_step=7)
    assert all(torch.equal(next(resumed)[0], x) for x, _ in batches[7:])  # resumable
    other = DeviceBatches(pixels, labels, batch=batch, seed=4)
    assert not torch.equal(next(other)[1], batches[0][1])
    floats = DeviceBatches(to_unit_range(pixels), None, batch=batch, seed=3)
    x, y = next(floats)
    assert y is None and torch.equal(x, batches[0][0])  # float images are used as they are


@pytest.mark.parametrize("world_size", [1, 2])
def test_device_batches_are_the_tensor_batches_of_fit(world_size):
    """The same batches as acai_fast.loop.tensor_batches (fit's in-memory path), rank by rank."""
    from acai_fast.loop import tensor_batches

    pixels, labels = indexed_pixels(45), torch.arange(45)
    for rank in range(world_size):
        ours = DeviceBatches(pixels, labels, batch=4, seed=5, start_step=3, rank=rank, world_size=world_size)
        theirs = tensor_batches(to_unit_range(pixels), labels, batch=4, seed=5, start_step=3, rank=rank,
                                world_size=world_size)
        for _ in range(12):
            (x, y), (x2, y2) = next(ours), next(theirs)
            assert torch.equal(x, x2) and torch.equal(y, y2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(images=torch.zeros(4, 32, 32, dtype=torch.uint8)), r"\(N, C, H, W\)"),
    (dict(images=torch.zeros(4, 1, 32, 32, dtype=torch.int32)), "uint8 pixels or floating"),
    (dict(batch=0), "batch must be a positive integer"),
    (dict(batch=20), "need at least one batch of 20"),
    (dict(labels=torch.zeros(3, dtype=torch.long)), r"labels must be \(N,\) = \(10,\)"),
    (dict(start_step=-1), "start_step"),
    (dict(rank=2, world_size=2), "rank < world_size"),
    (dict(batch=3, world_size=4), "need at least one batch of 12"),
])
def test_device_batches_bad_input(kwargs, message):
    args = dict(images=indexed_pixels(10), labels=None, batch=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        DeviceBatches(args.pop("images"), args.pop("labels"), **args)


def test_data_folder_from_argument_or_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("ACAI_FAST_DATA", raising=False)
    with pytest.raises(ValueError, match="pass --data DIR .*ACAI_FAST_DATA"):
        data_folder(None)
    monkeypatch.setenv("ACAI_FAST_DATA", str(tmp_path))
    assert data_folder(None) == tmp_path and data_folder("elsewhere").name == "elsewhere"
    assert DATASETS == ("mnist", "fashion_mnist", "svhn", "cifar10", "celeba")
