"""Collectives over MPI for host (numpy) arrays: what NumpyBackend.collectives returns for
data-parallel training (engine.distributed). The CUDA backend's arrays go through NCCL instead
(cuda/nccl.py). mpi4py is imported only when asked for (`pip install -e .[dist]`)."""


class MpiAllreduce:
    """Sums contiguous host arrays over the ranks of an MPI communicator, in place."""

    def __init__(self, comm):
        from mpi4py import MPI

        self.comm, self.mpi = comm, MPI

    def allreduce_sum_(self, array):
        self.comm.Allreduce(self.mpi.IN_PLACE, array, op=self.mpi.SUM)
        return array
