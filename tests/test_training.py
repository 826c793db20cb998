"""engine/train.py: a short MNIST training run whose loss falls, reproducibility from a seed,
and evaluate() against a direct count."""

import io
import os
import re

import numpy as np
import pytest

from engine.data import Dataset, read_idx
from engine.network import Network
from engine.train import evaluate, train

from conftest import CFG, ROOT

MNIST = os.path.join(ROOT, "data", "mnist")


@pytest.fixture(scope="module")
def mnist_subset():
    """The first 320 MNIST training images, as Darknet reads them (u8/255)."""
    images = read_idx(os.path.join(MNIST, "train-images.idx3-ubyte.gz"))[:320]
    labels = read_idx(os.path.join(MNIST, "train-labels.idx1-ubyte.gz"))[:320].astype(np.int64)
    return Dataset(images[:, None].astype(np.float32) / np.float32(255), labels, 10, "mnist-subset")


def _cfg(tmp_path, batch, max_batches):
    with open(os.path.join(CFG, "mnist.cfg")) as handle:
        text = handle.read()
    path = tmp_path / f"mnist_b{batch}.cfg"
    path.write_text(text.replace("batch=128", f"batch={batch}")
                    .replace("max_batches=2000", f"max_batches={max_batches}"))
    return str(path)


def _run(cfg, dataset, backup, seed):
    net = Network(cfg, seed=seed, quiet=True)
    out = io.StringIO()
    final = train(net, dataset, str(backup), seed=seed, backup_every=0, stream=out)
    losses = [float(m.group(1)) for m in re.finditer(r"^\d+, [\d.]+: ([\d.naif]+),", out.getvalue(), re.M)]
    return net, losses, final


def test_short_training_run_loss_falls(tmp_path, mnist_subset):
    """cfg/mnist.cfg with batch 16, 25 iterations on 320 images: the average loss of the last 5
    iterations is well below that of the first 5 (the first is near chance, ln 10 = 2.3)."""
    net, losses, final = _run(_cfg(tmp_path, 16, 25), mnist_subset, tmp_path / "backup", seed=1)
    assert len(losses) == 25 and all(np.isfinite(losses))
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert losses[0] > 1.5
    assert last < 0.6 * first, (first, last)
    assert net.seen == 25 * 16
    assert os.path.exists(final)
    top1, top2 = evaluate(net, mnist_subset, top=2, batch_size=160)
    assert top1 > 0.6 and top2 >= top1


def test_training_is_reproducible_with_a_seed(tmp_path, mnist_subset):
    """Same seed: identical losses and weights; another seed: different ones."""
    cfg = _cfg(tmp_path, 16, 6)
    runs = [_run(cfg, mnist_subset, tmp_path / f"b{i}", seed) for i, seed in enumerate((4, 4, 5))]
    (a, la, _), (b, lb, _), (c, lc, _) = runs
    assert la == lb and la != lc
    for x, y in zip(a.layers, b.layers):
        for name in x.params:
            np.testing.assert_array_equal(x.params[name], y.params[name])
    assert not np.array_equal(a.layers[0].params["weights"], c.layers[0].params["weights"])


def test_evaluate_counts_top1_and_topk():
    """evaluate() against a hand count on a network whose outputs are known."""

    class Fixed:
        def predict(self, images, batch_size=None):
            return images.reshape(len(images), -1)

    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]], np.float32)
    labels = np.array([1, 2, 1, 2])
    top1, top2 = evaluate(Fixed(), Dataset(scores, labels, 3, "fixed"), top=2, batch_size=3)
    assert top1 == pytest.approx(1 / 4)        # only the first is right
    assert top2 == pytest.approx(3 / 4)        # 2nd and 3rd are in the top 2, the 4th is not


def test_train_refuses_mismatched_classes(tmp_path, mnist_subset):
    from engine.errors import ConfigError

    net = Network(_cfg(tmp_path, 16, 2), quiet=True)
    wrong = Dataset(mnist_subset.images[:32], mnist_subset.labels[:32] % 5, 5, "five-classes")
    with pytest.raises(ConfigError, match="5 classes"):
        train(net, wrong, str(tmp_path), stream=io.StringIO())


def _linear_net(tmp_path, batch=16, max_batches=3):
    from helpers import write_cfg

    path = write_cfg(tmp_path / "lin.cfg", dict(batch=batch, height=2, width=2, channels=1,
                                                max_batches=max_batches, learning_rate=0.1),
                     "[connected]\noutput=3\nactivation=linear\n\n[softmax]\n")
    return Network(path, quiet=True)


def test_dataset_smaller_than_a_batch(tmp_path):
    """10 images, batch 16: every update still uses 16 images, and max_batches=3 means 3 updates
    (numbered 1, 2, 3)."""
    net = _linear_net(tmp_path)
    rng = np.random.default_rng(0)
    ds = Dataset(rng.uniform(0, 1, (10, 1, 2, 2)).astype(np.float32), np.arange(10) % 3, 3, "ten")
    out = io.StringIO()
    train(net, ds, str(tmp_path / "b"), stream=out)
    numbers = [int(m.group(1)) for m in re.finditer(r"^(\d+), ", out.getvalue(), re.M)]
    assert numbers == [1, 2, 3] and net.seen == 48


def test_empty_dataset_is_an_error(tmp_path):
    from engine.errors import DataError

    ds = Dataset(np.zeros((0, 1, 2, 2), np.float32), np.zeros(0, np.int64), 3, "empty")
    with pytest.raises(DataError, match="empty: no images"):
        train(_linear_net(tmp_path), ds, str(tmp_path), stream=io.StringIO())


def test_batch_sampler_epochs():
    """Within an epoch no image repeats; the sequence is fixed by the seed."""
    from engine.train import BatchSampler

    sampler = BatchSampler(10, 3, np.random.default_rng(1))
    epoch = np.concatenate([sampler.next() for _ in range(3)])
    assert len(set(epoch.tolist())) == 9
    again = BatchSampler(10, 3, np.random.default_rng(1))
    np.testing.assert_array_equal(np.concatenate([again.next() for _ in range(3)]), epoch)


def test_diverging_loss_stops_with_a_clear_error(tmp_path):
    """A loss that becomes inf/nan stops training with TrainingError; the last good backup is
    kept (not overwritten by the damaged weights) and still loads."""
    from engine.errors import TrainingError
    from helpers import write_cfg

    path = write_cfg(tmp_path / "div.cfg", dict(batch=4, height=2, width=2, channels=1, max_batches=50,
                                                learning_rate=1e10, momentum=0, decay=0),
                     "[connected]\noutput=3\nactivation=linear\n\n[cost]\ntype=sse\n")
    net = Network(path, quiet=True)
    rng = np.random.default_rng(0)
    ds = Dataset(rng.uniform(0, 1, (8, 1, 2, 2)).astype(np.float32), np.arange(8) % 3, 3, "div")
    backup = tmp_path / "b" / "div.backup"
    with np.errstate(all="ignore"), pytest.raises(TrainingError, match="lower learning_rate") as info:
        train(net, ds, str(tmp_path / "b"), stream=io.StringIO(), backup_every=1)
    assert f"the last good weights are {backup} (iteration " in str(info.value)
    assert "--precision bf16" not in str(info.value)
    Network(path, quiet=True).load_weights(str(backup))  # finite: it loads
    # In fp16 (a GPU precision; its name stands in here) the error also suggests bf16's range.
    net = Network(path, quiet=True)
    net.ops.precision = "fp16"
    with np.errstate(all="ignore"), pytest.raises(TrainingError, match="or --precision bf16"):
        train(net, ds, str(tmp_path / "c"), stream=io.StringIO(), backup_every=1)


def test_a_folded_network_cannot_be_trained(tmp_path):
    from engine.errors import TrainingError
    from helpers import write_cfg

    path = write_cfg(tmp_path / "f.cfg", dict(batch=2, height=4, width=4, channels=1, max_batches=2),
                     "[convolutional]\nfilters=2\nsize=3\npad=1\nbatch_normalize=1\n\n"
                     "[connected]\noutput=3\n\n[softmax]\n")
    net = Network(path, quiet=True).fold_batchnorm()
    ds = Dataset(np.zeros((4, 1, 4, 4), np.float32), np.arange(4) % 3, 3, "f")
    with pytest.raises(TrainingError, match="folded for inference"):
        train(net, ds, str(tmp_path / "b"), stream=io.StringIO())
