"""Data-parallel training over ranks: MPI (mpi4py) starts and coordinates them; gradients are
summed with one all-reduce per iteration, by the collectives the backend provides
(ops.collectives: NCCL for GPU arrays, MPI for host arrays).

Every rank builds the same network from the same seed and draws the same global batches; each
trains on its own shard of every batch, the ranks' accumulated gradients are summed, and every rank
applies the same update, so the replicas stay identical (checked at the end of training). Batch
norm statistics are per rank, as in Darknet. Only rank 0 prints and writes weights.

`pip install -e .[dist]` brings mpi4py and an MPI runtime (PyPI's mpich) with its `mpiexec`.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import time

from .errors import BackendError, ConfigError

# Seconds a failing rank waits between printing its error and aborting the job (see abort).
ABORT_GRACE_S = 1.0

# Environment variables MPI launchers set for each rank (MPICH/Hydra, Open MPI, Slurm's PMI).
_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")


def launched_by_mpi():
    """True when this process is one of several ranks started by mpiexec."""
    return any(int(os.environ.get(name, "1") or 1) > 1 for name in _SIZE_VARIABLES)


class SingleProcess:
    """The trivial group of one: what training uses without MPI."""

    rank, size = 0, 1

    def shard(self, count):
        return slice(0, count)

    def adopt(self, net):
        pass

    def allreduce_updates(self, net):
        pass

    def allreduce_sum(self, value):
        return value

    def check_replicas(self, net):
        pass

    def abort(self, code=1):
        pass


class MpiGroup:
    """The ranks of MPI.COMM_WORLD, training one network together."""

    def __init__(self):
        try:
            from mpi4py import MPI
        except ImportError:
            raise BackendError("this process was started by mpiexec but mpi4py is not installed; "
                               "pip install -e .[dist]") from None
        self.mpi = MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.collectives = self.bucket = None

    def shard(self, count):
        """This rank's contiguous share of a global batch of `count` images."""
        if count % self.size:
            raise ConfigError(f"the batch of {count} images does not split evenly over "
                              f"{self.size} ranks")
        share = count // self.size
        return slice(self.rank * share, (self.rank + 1) * share)

    def adopt(self, net):
        """Re-home every layer's gradient buffer as a view into one flat bucket, so the
        iteration's gradients are summed by a single all-reduce with no copies, by the
        backend's collectives."""
        ops = net.ops
        entries = [(layer, name) for layer in net.layers for name in sorted(layer.updates)]
        total = sum(layer.updates[name].size for layer, name in entries)
        self.bucket = ops.zeros((total,)) if total else None
        start = 0
        for layer, name in entries:
            current = layer.updates[name]
            view = self.bucket[start:start + current.size].reshape(current.shape)
            ops.add_(view, current)
            layer.updates[name] = view
            start += current.size
        if self.bucket is not None:
            self.collectives = ops.collectives(self.comm)

    def allreduce_updates(self, net):
        """Sum every layer's accumulated gradients over the ranks (one bucket, one call); the
        optimiser's state (velocities) is the same on every rank and never crosses."""
        if self.bucket is None:
            return
        self.collectives.allreduce_sum_(self.bucket)

    def allreduce_sum(self, value):
        return self.comm.allreduce(value, op=self.mpi.SUM)

    def check_replicas(self, net):
        """Raise if any rank's trained parameters differ from rank 0's (they must be identical;
        the rolling BN statistics are each rank's own, so they are left out)."""
        digest = hashlib.sha256()
        for layer in net.layers:
            for name in sorted(layer.updates):  # the trained ones: weights, biases, scales
                digest.update(net.ops.to_host(layer.params[name]).tobytes())
        digests = self.comm.allgather(digest.hexdigest())
        if len(set(digests)) != 1:
            differing = [r for r, d in enumerate(digests) if d != digests[0]]
            raise BackendError(f"replicas diverged: ranks {differing} hold weights that differ "
                               "from rank 0's")

    def abort(self, code=1):
        """Stop every rank now (a rank that fails must not leave the others waiting)."""
        sys.stdout.flush()
        sys.stderr.flush()
        # MPI_Abort makes the launcher kill every rank at once, and with them whatever output it
        # has not yet forwarded: this rank's error line included. A moment's grace lets it through.
        time.sleep(ABORT_GRACE_S)
        self.comm.Abort(code)
        os._exit(code)  # MPI_Abort should not return; never carry on past it if it does


def process_group():
    return MpiGroup() if launched_by_mpi() else SingleProcess()


def relaunch_with_mpiexec(ranks, argv):
    """Start `ranks` copies of this command under mpiexec and wait for them; returns the exit
    code. Used by `engine train --gpus 0,1,...` so users need not call mpiexec themselves."""
    mpiexec = shutil.which("mpiexec") or os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if not os.path.exists(mpiexec):
        raise BackendError("training on several GPUs needs mpiexec; pip install -e .[dist]")
    command = [mpiexec, "-n", str(ranks), sys.executable, "-m", "engine.cli"] + list(argv)
    return subprocess.call(command)
