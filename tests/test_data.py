"""engine/data.py: gzipped IDX files, Darknet's image-list classification format (.data file,
label = the label string found in the path), clear errors, and the bundled MNIST."""

import gzip
import hashlib
import os
import struct

import numpy as np
import pytest
from PIL import Image

from engine import data as data_io
from engine.errors import ConfigError, DataError

from conftest import ROOT

IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}


def write_idx(path, array, compress=True):
    """An IDX file written from its specification: 0, 0, type code, ndim, big-endian dims, data."""
    array = np.asarray(array)
    dtype = array.dtype if array.dtype == np.uint8 else array.dtype.newbyteorder(">")
    header = bytes([0, 0, IDX_CODES[np.dtype(dtype)], array.ndim]) + struct.pack(f">{array.ndim}I",
                                                                                 *array.shape)
    payload = header + array.astype(dtype).tobytes()
    opener = gzip.open if compress else open
    with opener(path, "wb") as handle:
        handle.write(payload)
    return str(path)


# ---- IDX -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_images_and_labels(tmp_path, compress):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 5, 4), dtype=np.uint8)
    labels = rng.integers(0, 10, 7).astype(np.uint8)
    suffix = ".gz" if compress else ""
    got = data_io.read_idx(write_idx(tmp_path / f"i.idx3{suffix}", images, compress))
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal(data_io.read_idx(write_idx(tmp_path / f"l.idx1{suffix}", labels,
                                                             compress)), labels)


def test_read_idx_other_types(tmp_path):
    ints = np.array([[1, -2], [300000, 4]], dtype=np.int32)
    floats = np.array([0.5, -1.25, 3.0], dtype=np.float32)
    np.testing.assert_array_equal(data_io.read_idx(write_idx(tmp_path / "a.gz", ints)), ints)
    np.testing.assert_array_equal(data_io.read_idx(write_idx(tmp_path / "b.gz", floats)), floats)


def test_idx_bad_magic(tmp_path):
    path = tmp_path / "bad.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(b"\x1f\x8b\x08\x03" + b"\0" * 20)
    with pytest.raises(DataError, match="bad.gz: not an IDX file"):
        data_io.read_idx(str(path))


def test_idx_wrong_size(tmp_path):
    path = tmp_path / "short.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(bytes([0, 0, 8, 2]) + struct.pack(">2I", 3, 3) + b"\0" * 8)
    with pytest.raises(DataError, match="promises 9 bytes of data, file has 8"):
        data_io.read_idx(str(path))


def test_idx_not_gzip_and_missing(tmp_path):
    path = tmp_path / "plain.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="plain.gz: cannot read IDX file"):
        data_io.read_idx(str(path))
    with pytest.raises(DataError, match="gone.gz: data file not found"):
        data_io.read_idx(str(tmp_path / "gone.gz"))


def test_idx_dataset_values_and_checks(tmp_path):
    """Pixels are float32(u8)/255 (Darknet's values), NCHW; counts and label ranges are checked."""
    images = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 15
    img = write_idx(tmp_path / "x.idx3.gz", images)
    lab = write_idx(tmp_path / "y.idx1.gz", np.array([1, 2], np.uint8))
    ds = data_io.load_idx_dataset(img, lab, 3, (1, 3, 3))
    assert ds.images.shape == (2, 1, 3, 3) and ds.images.dtype == np.float32
    np.testing.assert_array_equal(ds.images[:, 0], images.astype(np.float32) / np.float32(255))
    assert list(ds.labels) == [1, 2] and len(ds) == 2
    np.testing.assert_array_equal(ds.one_hot(ds.labels), [[0, 1, 0], [0, 0, 1]])
    with pytest.raises(DataError, match="labels must lie in 0..1"):
        data_io.load_idx_dataset(img, lab, 2, (1, 3, 3))
    three = write_idx(tmp_path / "z.idx1.gz", np.array([1, 2, 0], np.uint8))
    with pytest.raises(DataError, match="2 images but .* has 3 labels"):
        data_io.load_idx_dataset(img, three, 3, (1, 3, 3))
    with pytest.raises(DataError, match="network expects 4x4x1"):
        data_io.load_idx_dataset(img, lab, 3, (1, 4, 4))


# ---- image lists -----------------------------------------------------------------------------------
LABELS = ["alpha", "bravo", "charlie"]


def _image_set(tmp_path, mode="L", size=(4, 3)):
    """Images named after their label, a list file with relative paths, a labels file, .data."""
    folder = tmp_path / "imgs"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    names, arrays = [], []
    for i, label in enumerate(["bravo", "alpha", "charlie", "alpha"]):
        shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        name = f"imgs/{i:03d}_{label}.png"
        Image.fromarray(pixels, mode).save(tmp_path / name)
        names.append(name)
        arrays.append(pixels)
    (tmp_path / "train.list").write_text("\n".join(names) + "\n\n")
    (tmp_path / "labels.txt").write_text("\n".join(LABELS) + "\n")
    (tmp_path / "set.data").write_text(f"classes=3\ntrain=train.list\nvalid=train.list\n"
                                       f"labels=labels.txt\nbackup={tmp_path / 'backup'}\ntop=2\n")
    return str(tmp_path / "set.data"), arrays


def test_image_list_dataset_gray(tmp_path):
    """Labels come from the label string in each path; pixels are u8/255; relative paths are
    resolved against the list file's folder."""
    data_path, arrays = _image_set(tmp_path)
    config = data_io.DataConfig(data_path)
    assert config.labels == LABELS and config.classes == 3 and config.top == 2
    ds = config.dataset("train", (1, 3, 4))
    assert list(ds.labels) == [1, 0, 2, 0]
    assert ds.images.shape == (4, 1, 3, 4)
    for got, want in zip(ds.images, arrays):
        np.testing.assert_array_equal(got[0], want.astype(np.float32) / np.float32(255))


def test_image_list_dataset_rgb_and_resize(tmp_path):
    data_path, arrays = _image_set(tmp_path, mode="RGB")
    ds = data_io.DataConfig(data_path).dataset("train", (3, 3, 4))
    for got, want in zip(ds.images, arrays):
        np.testing.assert_array_equal(got, want.transpose(2, 0, 1).astype(np.float32) / 255)
    resized = data_io.DataConfig(data_path).dataset("valid", (3, 6, 8))
    assert resized.images.shape == (4, 3, 6, 8)
    assert 0 <= resized.images.min() and resized.images.max() <= 1


def test_first_label_in_labels_order_wins(tmp_path):
    """Darknet's rule: the first label of the labels file (in its order) found in the path."""
    _image_set(tmp_path)
    Image.fromarray(np.zeros((3, 4), np.uint8)).save(tmp_path / "imgs" / "charlie_alpha.png")
    (tmp_path / "one.list").write_text("imgs/charlie_alpha.png\n")
    ds = data_io.load_image_list(str(tmp_path / "one.list"), LABELS, (1, 3, 4))
    assert list(ds.labels) == [0]


def test_image_list_errors(tmp_path):
    _image_set(tmp_path)
    (tmp_path / "missing.list").write_text("imgs/000_bravo.png\nimgs/999_alpha.png\n")
    with pytest.raises(DataError, match="999_alpha.png: image file not found"):
        data_io.load_image_list(str(tmp_path / "missing.list"), LABELS, (1, 3, 4))
    (tmp_path / "imgs" / "bad_alpha.png").write_bytes(b"this is not a PNG")
    (tmp_path / "bad.list").write_text("imgs/bad_alpha.png\n")
    with pytest.raises(DataError, match="bad_alpha.png: cannot decode image"):
        data_io.load_image_list(str(tmp_path / "bad.list"), LABELS, (1, 3, 4))
    (tmp_path / "nolabel.list").write_text("imgs/000_bravo.png\nimgs/zulu.png\n")
    with pytest.raises(DataError, match=r"nolabel.list:2: no label .* 'imgs/zulu.png'"):
        data_io.load_image_list(str(tmp_path / "nolabel.list"), LABELS, (1, 3, 4))
    (tmp_path / "empty.list").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        data_io.load_image_list(str(tmp_path / "empty.list"), LABELS, (1, 3, 4))
    with pytest.raises(DataError, match="nope.list: image list file not found"):
        data_io.load_image_list(str(tmp_path / "nope.list"), LABELS, (1, 3, 4))


def test_truncated_png_is_a_decode_error(tmp_path):
    path = tmp_path / "cut_alpha.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 20), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(DataError, match="cut_alpha.png: cannot decode image"):
        data_io.load_image(str(path), (1, 20, 20))


def test_data_file_errors(tmp_path):
    data_path, _ = _image_set(tmp_path)
    (tmp_path / "m.data").write_text("classes=3\ntrain=absent.list\nlabels=labels.txt\n")
    with pytest.raises(ConfigError, match=r"m.data: train=absent.list: file not found"):
        data_io.DataConfig(str(tmp_path / "m.data")).dataset("train", (1, 3, 4))
    (tmp_path / "n.data").write_text("classes=3\nlabels=labels.txt\n")
    with pytest.raises(ConfigError, match=r"no valid=\.\.\. entry"):
        data_io.DataConfig(str(tmp_path / "n.data")).dataset("valid", (1, 3, 4))
    (tmp_path / "c.data").write_text("classes=4\nlabels=labels.txt\n")
    with pytest.raises(ConfigError, match="classes=4 but .* lists 3 labels"):
        data_io.DataConfig(str(tmp_path / "c.data"))
    (tmp_path / "l.data").write_text("classes=3\nlabels=gone.txt\n")
    with pytest.raises(ConfigError, match="labels=gone.txt: file not found"):
        data_io.DataConfig(str(tmp_path / "l.data"))
    (tmp_path / "t.data").write_text("classes=three\n")
    with pytest.raises(ConfigError, match="must be integers"):
        data_io.DataConfig(str(tmp_path / "t.data"))
    with pytest.raises(ConfigError, match="data file not found"):
        data_io.DataConfig(str(tmp_path / "none.data"))


def test_idx_data_file_needs_labels(tmp_path):
    write_idx(tmp_path / "x.idx3.gz", np.zeros((2, 3, 3), np.uint8))
    (tmp_path / "i.data").write_text("classes=2\ntrain=x.idx3.gz\n")
    with pytest.raises(ConfigError, match="train_labels"):
        data_io.DataConfig(str(tmp_path / "i.data")).dataset("train", (1, 3, 3))


def test_default_data_path():
    assert data_io.default_data_path(os.path.join("cfg", "mnist.cfg")) == os.path.join("cfg", "mnist.data")


# ---- bundled MNIST ------------------------------------------------------------------------------------
MNIST = os.path.join(ROOT, "data", "mnist")


def test_bundled_mnist_matches_sha256sums():
    with open(os.path.join(MNIST, "SHA256SUMS")) as handle:
        entries = [line.split() for line in handle if line.strip()]
    assert len(entries) == 4
    for digest, name in entries:
        with open(os.path.join(MNIST, name), "rb") as stream:
            assert hashlib.sha256(stream.read()).hexdigest() == digest, name


def test_bundled_mnist_test_set_through_mnist_data():
    """cfg/mnist.data's valid set: 10000 28x28 images in [0, 1], labels 0..9."""
    config = data_io.DataConfig(os.path.join(ROOT, "cfg", "mnist.data"))
    ds = config.dataset("valid", (1, 28, 28))
    assert ds.images.shape == (10000, 1, 28, 28) and len(ds) == 10000
    assert ds.images.min() == 0 and ds.images.max() == 1
    assert sorted(set(ds.labels.tolist())) == list(range(10))
    assert config.labels == [str(i) for i in range(10)] or len(config.labels) == 10
    # the golden G1 inputs are the first MNIST test images, as Darknet read them
    golden = np.fromfile(os.path.join(ROOT, "tests", "golden", "G1_mnist_trained", "inputs.bin"),
                         dtype="<f4").reshape(64, 1, 28, 28)
    np.testing.assert_array_equal(ds.images[:64], golden)


def test_host_batches_reuse_arrays_in_turn_and_keep_two_sizes():
    from engine.data import HostBatches

    made = []

    def allocate(shape):
        made.append(np.empty(shape, np.float32))
        return made[-1]
    batches = HostBatches(allocate)
    a, b = batches((2, 3, 4, 4)), batches((2, 3, 4, 4))
    assert a is not b and batches((2, 3, 4, 4)) is a and batches((2, 3, 4, 4)) is b
    assert len(made) == 2  # in turn, no new allocation
    c = batches((2, 3, 8, 8))
    assert c.shape == (2, 3, 8, 8) and len(made) == 3
    batches((2, 3, 6, 6))  # a third size: the oldest (4x4) is let go
    assert set(batches.rings) == {(2, 3, 8, 8), (2, 3, 6, 6)}
    assert batches((2, 3, 4, 4)) is not a
