"""Your own images (acai_fast.data.images): a folder of image files of any size and nesting, or an
.npy/.npz array, prepared as CelebA (centre square, TF1 bicubic resize to 32x32, the preset's
colours) and split by a seeded fraction; the one-line errors; which --data is the paper's."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from acai_fast.data import is_official, is_own_data, load_images, resize_bicubic, to_unit_range
from acai_fast.data.images import find_images, load_image_files, prepare, shrink_factor, to_colors

CLASSES = ("circles", "noise", "stripes")


def write_image_folder(root, n=300, seed=0):
    """`n` images in three class subfolders (some nested deeper), mixed sizes (8..90 pixels a side,
    a few large ones), PNG and JPEG, RGB, grey, palette and RGBA. Returns the relative paths."""
    rng = np.random.default_rng(seed)
    written = []
    for i in range(n):
        cls = CLASSES[i % 3]
        h, w = (int(v) for v in rng.integers(8, 91, size=2))
        if i % 50 == 7:
            h, w = 300, 260  # shrunk by a box average before the resize
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        pixels[..., i % 3] //= 4  # the classes differ a little in colour
        image = Image.fromarray(pixels)
        if i % 5 == 1:
            image = image.convert("L")
        elif i % 5 == 2:
            image = image.convert("P")
        elif i % 5 == 3:
            image = image.convert("RGBA")
        folder = root / cls / ("deeper" if i % 4 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        name = f"img{i:03d}." + ("jpg" if i % 7 == 0 and image.mode in ("RGB", "L") else "png")
        image.save(folder / name)
        written.append((folder / name).relative_to(root).as_posix())
    return sorted(written)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    return root, write_image_folder(root)


def test_folder_labels_names_and_split(image_folder):
    root, written = image_folder
    data = load_images(root, colors=3, progress=False)
    assert data.images.shape == (300, 3, 32, 32) and data.images.dtype == torch.float32
    assert -1 <= float(data.images.min()) and float(data.images.max()) <= 1
    assert data.names == written and data.classes == list(CLASSES) and data.nclass == 3
    assert data.labels.tolist() == [CLASSES.index(name.split("/")[0]) for name in written]
    # 30 test images (round(300 * 0.1)), a pure function of the files, the fraction and the seed
    assert int(data.is_test.sum()) == 30
    again = load_images(root, colors=3, progress=False)
    assert torch.equal(again.is_test, data.is_test) and torch.equal(again.images, data.images)
    assert not torch.equal(load_images(root, colors=3, seed=1, progress=False).is_test, data.is_test)
    x_train, y_train = data.split("train")
    x_test, y_test = data.split("test")
    assert len(x_train) == 270 and len(x_test) == 30
    assert torch.equal(x_test, data.images[data.is_test]) and torch.equal(y_train, data.labels[~data.is_test])
    # a fraction of 0: the test split is the training images (as CelebA's)
    whole = load_images(root, colors=1, test_fraction=0.0, progress=False)
    assert whole.images.shape == (300, 1, 32, 32) and len(whole.split("test")[0]) == 300
    assert len(load_images(root, colors=1, test_fraction=0.5, progress=False).split("test")[0]) == 150


def test_small_sets_keep_a_test_pair(tmp_path):
    for i in range(3):
        Image.fromarray(np.full((9, 9), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    data = load_images(tmp_path, colors=1, progress=False)  # round(0.3) = 0, raised to a pair
    assert data.labels is None and data.classes is None and int(data.is_test.sum()) == 2


def test_preparation_values(tmp_path):
    rng = np.random.default_rng(3)
    rgb32 = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    wide = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)  # 32 high, 40 wide: columns 4..35 kept
    grey = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    big = rng.integers(0, 256, (64, 70, 3), dtype=np.uint8)  # square 64 (columns 3..66), resized bicubically
    huge = rng.integers(0, 256, (600, 600, 3), dtype=np.uint8)  # box average by 600 // 64 = 9 over 594 pixels
    deep = (rng.integers(0, 65536, (32, 32))).astype(np.uint16)  # 16-bit grey
    for name, pixels in (("rgb32", rgb32), ("wide", wide), ("grey", grey), ("big", big), ("huge", huge),
                         ("deep", deep)):
        Image.fromarray(pixels).save(tmp_path / f"{name}.png")
    load = lambda name, colors: load_image_files([tmp_path / f"{name}.png"], colors)[0]
    scaled = lambda p: to_unit_range(torch.from_numpy(np.array(p))).permute(2, 0, 1)

    assert torch.equal(load("rgb32", 3), scaled(rgb32))  # 32x32: the resize is the identity
    assert torch.equal(load("wide", 3), scaled(wide[:, 4:36]))
    assert torch.equal(load("grey", 3), scaled(grey[..., None]).expand(3, 32, 32))
    luma = np.asarray(Image.fromarray(rgb32).convert("L"))  # RGB -> grey is exactly Pillow's luma
    assert torch.equal(load("rgb32", 1), scaled(luma[..., None]))
    expected = resize_bicubic(scaled(big[:, 3:67])[None], (32, 32), "tf1").clamp(-1, 1)[0]
    assert torch.equal(load("big", 3), expected)
    assert shrink_factor(600) == 9 and shrink_factor(255) == 1 and shrink_factor(146) == 1
    boxed = scaled(huge[3:597, 3:597]).reshape(3, 66, 9, 66, 9).mean(dim=(2, 4))
    torch.testing.assert_close(load("huge", 3), resize_bicubic(boxed[None], (32, 32), "tf1").clamp(-1, 1)[0],
                               rtol=0, atol=1e-6)  # the same sums; only the mean's reduction order may differ
    eight_bit = ((deep.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535)
    assert torch.equal(load("deep", 1), scaled(eight_bit[..., None]))
    # a JPEG is decoded by Pillow and prepared as any other image
    Image.fromarray(big).save(tmp_path / "big.jpg", quality=90)
    decoded = np.asarray(Image.open(tmp_path / "big.jpg"))
    assert torch.equal(load_image_files([tmp_path / "big.jpg"], 3)[0], prepare([decoded], 3)[0])
    assert to_colors(np.zeros((2, 2, 1), np.uint8), 1).shape == (2, 2, 1)


def test_arrays(tmp_path):
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    y = np.array(["cat", "dog", "emu", "cat"] * 5)
    np.savez(tmp_path / "a.npz", images=x, labels=y, names=np.array([f"f{i}" for i in range(20)]))
    data = load_images(tmp_path / "a.npz", colors=3, progress=False)
    assert data.images.shape == (20, 3, 32, 32) and data.classes == ["cat", "dog", "emu"]
    assert data.labels.tolist() == [["cat", "dog", "emu"].index(v) for v in y] and data.names[3] == "f3"
    assert torch.equal(data.images, prepare(x[..., None], 3))
    # x/y keys, integer labels numbered in sorted order; a single unnamed array; an .npy
    np.savez(tmp_path / "b.npz", x=x[..., None].repeat(3, axis=3), y=np.arange(20) % 4 * 10 + 3)
    data = load_images(tmp_path / "b.npz", colors=1, progress=False)
    assert data.classes == ["3", "13", "23", "33"] and data.labels.tolist() == (np.arange(20) % 4).tolist()
    assert data.names[0] == "images[0]" and data.images.shape == (20, 1, 32, 32)
    np.savez(tmp_path / "c.npz", x)
    np.save(tmp_path / "d.npy", x)
    for name in ("c.npz", "d.npy"):
        data = load_images(tmp_path / name, colors=1, progress=False)
        assert data.labels is None and torch.equal(data.images, prepare(x[..., None], 1))


def _truncated_png(path):
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8) + 7).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue()[:60])


@pytest.mark.parametrize("case, message", [
    ("empty", "no images found"),
    ("one", "found 1 image"),
    ("truncated", r"bad\.png: not a readable image .*truncated"),
    ("not_an_image", r"bad\.png: not a readable image"),
    ("mode_f", r"bad\.tif: floating-point pixels \(mode F\) have no agreed 8-bit colours"),
    ("top_and_sub", "lie directly in the folder beside the class subfolders a/"),
    ("npz_keys", r"expected the key 'images' or 'x' .*found 'pics', 'tags'"),
    ("npz_dtype", r"must be uint8 pixels .*float32; if they lie in \[0, 1\]"),
    ("npz_channels_first", r"\(N, H, W, C\) with C 1 or 3, got shape \(4, 3, 8, 8\); channels first"),
    ("npz_labels", r"labels must be one integer or string per image, shape \(4,\)"),
    ("npz_one", "1 image.*need at least 2"),
    ("npz_damaged", "not a readable .npz array file"),
])
def test_errors_name_the_file(tmp_path, case, message):
    folder = tmp_path / "data"
    folder.mkdir()
    ok = lambda path: Image.fromarray(np.zeros((8, 8), np.uint8)).save(path)
    path = folder
    if case == "one":
        ok(folder / "only.png")
    elif case in ("truncated", "not_an_image", "mode_f"):
        ok(folder / "fine.png")
        if case == "truncated":
            _truncated_png(folder / "bad.png")
        elif case == "not_an_image":
            (folder / "bad.png").write_text("hello")
        else:
            Image.fromarray(np.zeros((8, 8), np.float32)).save(folder / "bad.tif")
    elif case == "top_and_sub":
        ok(folder / "stray.png")
        (folder / "a").mkdir()
        ok(folder / "a" / "x.png")
    elif case.startswith("npz"):
        path = tmp_path / "data.npz"
        good = np.zeros((4, 8, 8), np.uint8)
        arrays = dict(npz_keys=dict(pics=good, tags=np.arange(4)), npz_dtype=dict(images=good.astype(np.float32)),
                      npz_channels_first=dict(images=np.zeros((4, 3, 8, 8), np.uint8)),
                      npz_labels=dict(images=good, labels=np.arange(3)), npz_one=dict(images=good[:1]))
        if case == "npz_damaged":
            np.savez(path, images=good)
            path.write_bytes(path.read_bytes()[:100])
        else:
            np.savez(path, **arrays[case])
    with pytest.raises(ValueError, match=message):
        load_images(path, colors=1, progress=False)


def test_missing_paths_and_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_images(tmp_path / "nope.npz", colors=1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_files([tmp_path / "nope.png"], 1)
    (tmp_path / "list.txt").write_text("a")
    with pytest.raises(ValueError, match="expected a folder of images or an .npy/.npz"):
        load_images(tmp_path / "list.txt", colors=1)
    with pytest.raises(ValueError, match="test_fraction"):
        load_images(tmp_path, colors=1, test_fraction=1.0)
    with pytest.raises(ValueError, match="colors"):
        load_images(tmp_path, colors=2)


def test_hidden_files_are_skipped(tmp_path):
    for name in ("a.png", "B.JPG", ".hidden.png", "notes.txt"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / name, format="PNG")
    (tmp_path / ".cache").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / ".cache" / "c.png")
    assert [p.name for p in find_images(tmp_path)] == ["B.JPG", "a.png"]


def test_which_data_is_the_papers(tmp_path):
    """A folder is the paper's dataset when it (or its dataset-named subfolder) holds an official
    file name; any other folder holding an image, or an .npy/.npz file, is the user's own images; a
    folder without any image is taken as the paper's (its loader then names the missing files)."""
    mnist = tmp_path / "mnist_root"
    mnist.mkdir()
    (mnist / "t10k-images-idx3-ubyte.gz").write_bytes(b"")
    root = tmp_path / "all"
    (root / "svhn").mkdir(parents=True)
    (root / "svhn" / "train_32x32.mat").write_bytes(b"")
    celeba = tmp_path / "celeba_root"
    (celeba / "img_align_celeba").mkdir(parents=True)
    jpegs = tmp_path / "img_align_celeba"
    jpegs.mkdir()
    photos = tmp_path / "photos"
    (photos / "mnist").mkdir(parents=True)  # a class named like a dataset: still the user's images
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(photos / "mnist" / "a.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (mnist, root, celeba, jpegs):
        assert is_official(folder) and not is_own_data(folder), folder
    assert is_own_data(photos) and not is_official(photos)
    assert not is_own_data(empty) and not is_official(empty)
    assert is_own_data(tmp_path / "x.npz") and is_own_data(tmp_path / "x.NPY")
    assert not is_own_data(tmp_path / "missing")  # the paper's loader says it does not exist


def test_gif_plays_back_and_forth(tmp_path):
    """save_interpolation_gif: frames 0..S-1..1 of every row, 4x enlarged, ends held longer."""
    from acai_fast.plotting import save_interpolation_gif

    steps = 4
    ramp = torch.linspace(-1, 1, steps).view(1, steps, 1, 1, 1)
    images = ramp.expand(2, steps, 1, 3, 5).clone()  # two rows, step t uniformly grey level t
    save_interpolation_gif(images, tmp_path / "a.gif")
    with Image.open(tmp_path / "a.gif") as gif:
        assert gif.n_frames == 2 * steps - 2 and gif.size == (5 * 4, (2 * 3 + 1) * 4)
        levels, durations = [], []
        for i in range(gif.n_frames):
            gif.seek(i)
            frame = np.asarray(gif.convert("L"))
            levels.append(int(frame[0, 0]))
            durations.append(gif.info["duration"])
            assert (frame[12:16] == 255).all()  # the white gap between the rows
    grey = [round((v + 1) * 127.5) for v in ramp.flatten().tolist()]
    assert levels == [grey[t] for t in (0, 1, 2, 3, 2, 1)] and durations == [600, 100, 100, 600, 100, 100]
