"""Data-parallel training on CPU ranks under mpiexec (issue 5): two ranks reach the weights one
process reaches on the same global batches, all ranks hold identical weights, and a rank that
dies stops the others quickly without harming the last backup."""

import os
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest import ROOT

pytest.importorskip("mpi4py")
MPIEXEC = shutil.which("mpiexec") or os.path.join(os.path.dirname(sys.executable), "mpiexec")
if not os.path.exists(MPIEXEC):
    pytest.skip("mpiexec not installed (pip install -e .[dist])", allow_module_level=True)

# No batch norm and no dropout: then sharding the batch changes nothing but summation order.
CFG = """
[net]
batch=32
subdivisions=2
height=28
width=28
channels=1
momentum=0.9
decay=0.0005
learning_rate=0.05
policy=steps
steps=3,6
scales=.5,.5
max_batches=8

[convolutional]
filters=8
size=3
stride=2
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[connected]
output=10
activation=linear

[softmax]
"""


@pytest.fixture
def setup(tmp_path):
    cfg = tmp_path / "small.cfg"
    cfg.write_text(CFG)
    mnist = os.path.join(ROOT, "data", "mnist")
    (tmp_path / "small.data").write_text(textwrap.dedent(f"""\
        classes=10
        train={mnist}/t10k-images.idx3-ubyte.gz
        train_labels={mnist}/t10k-labels.idx1-ubyte.gz
        labels={ROOT}/cfg/mnist.labels
        backup={tmp_path}/backup
        """))
    return tmp_path


def engine_command(*args):
    return [sys.executable, "-m", "engine.cli"] + list(args)


def run(command, cwd, timeout=120):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def weights_of(path):
    return np.fromfile(path, dtype="<f4")[5:]  # after the 20-byte header


def test_two_ranks_equal_one_process(setup):
    one = run(engine_command("train", "small.cfg", "--cpu", "--backup", "one"), setup)
    assert one.returncode == 0, one.stderr
    two = run([MPIEXEC, "-n", "2"] + engine_command("train", "small.cfg", "--cpu", "--backup", "two"),
              setup)
    assert two.returncode == 0, two.stderr + two.stdout
    assert "on 2 ranks" in two.stdout
    # Rank 0 alone prints the per-iteration lines.
    assert two.stdout.count("\n8, ") == 1
    single, parallel = weights_of(setup / "one" / "small_final.weights"), \
        weights_of(setup / "two" / "small_final.weights")
    assert single.shape == parallel.shape
    np.testing.assert_allclose(parallel, single, rtol=1e-5, atol=1e-6)
    # The run ends by comparing a digest of every rank's weights (check_replicas): it passed.


def test_two_ranks_train_a_network_with_batch_norm(setup):
    """BN statistics are each rank's own (as in Darknet): training still completes, the trained
    parameters agree across ranks (the closing replica check), and rank 0 saves."""
    bn_cfg = CFG.replace("[convolutional]\n", "[convolutional]\nbatch_normalize=1\n")
    (setup / "bn.cfg").write_text(bn_cfg)
    result = run([MPIEXEC, "-n", "2"] + engine_command("train", "bn.cfg", "--cpu", "--data",
                                                       "small.data", "--backup", "bn"), setup)
    assert result.returncode == 0, result.stderr + result.stdout
    assert (setup / "bn" / "bn_final.weights").exists()


RANK_DIES = """
import os, sys
sys.argv = ["engine", "train", "small.cfg", "--cpu", "--backup", "dies", "--backup-every", "2",
            "--max-batches", "1000"]
import engine.train as train_module
from engine.cli import main
original = train_module.train_iteration
calls = {"n": 0}

def dying(net, images, truth, rate, group):
    calls["n"] += 1
    if group.rank == 1 and calls["n"] == 5:
        os._exit(7)      # a hard death: no exception, no MPI call
    return original(net, images, truth, rate, group)

train_module.train_iteration = dying
sys.exit(main())
"""


def test_a_dying_rank_stops_the_others(setup):
    (setup / "dies.py").write_text(RANK_DIES)
    started = time.time()
    result = run([MPIEXEC, "-n", "2", sys.executable, "dies.py"], setup, timeout=60)
    elapsed = time.time() - started
    assert result.returncode != 0
    assert elapsed < 30, f"the surviving rank took {elapsed:.0f} s to stop"
    backup = setup / "dies" / "small.backup"
    assert backup.exists()
    # The last backup is whole: it loads into the network without a size error.
    import engine

    net = engine.load(str(setup / "small.cfg"), str(backup), quiet=True)
    # Iteration 4's backup, or iteration 2's when mpiexec stopped rank 0 while it wrote the next.
    assert net.seen in (2 * 32, 4 * 32)


def test_a_rank_error_is_one_line_and_stops_all(setup):
    (setup / "bad.cfg").write_text(CFG.replace("batch=32", "batch=33").replace("subdivisions=2",
                                                                                 "subdivisions=1"))
    result = run([MPIEXEC, "-n", "2"] + engine_command("train", "bad.cfg", "--cpu", "--data",
                                                       "small.data"), setup, timeout=60)
    assert result.returncode != 0
    assert "does not split evenly over 2 ranks" in result.stderr
    assert "engine train: rank " in result.stderr  # which rank failed is said
    assert "Traceback" not in result.stderr


def gpu_count():
    try:
        import pycuda.driver as cuda

        cuda.init()
        return cuda.Device.count()
    except Exception:
        return 0


@pytest.mark.gpu
@pytest.mark.parametrize("gpus", [2, 4])
def test_several_gpus_equal_one_gpu_through_nccl(setup, gpus):
    """The same equivalence on 2 and 4 GPUs, gradients summed by NCCL."""
    if gpu_count() < gpus:
        pytest.skip(f"needs {gpus} GPUs")
    one = run(engine_command("train", "small.cfg", "--gpu", "0", "--backup", "one"), setup)
    assert one.returncode == 0, one.stderr
    several = run(engine_command("train", "small.cfg", "--gpus", ",".join(map(str, range(gpus))),
                                "--backup", "several"), setup, timeout=300)
    assert several.returncode == 0, several.stderr + several.stdout
    assert f"on {gpus} ranks" in several.stdout
    np.testing.assert_allclose(weights_of(setup / "several" / "small_final.weights"),
                               weights_of(setup / "one" / "small_final.weights"), rtol=1e-4, atol=1e-5)
