"""A small ctypes binding of NCCL's all-reduce, for data-parallel training on several GPUs.

libnccl.so.2 is looked for where the system or a Python wheel (nvidia-nccl-*)
put it. The ranks agree on an ncclUniqueId through MPI; the all-reduce runs on the backend's
stream, so it is ordered after the backward pass that filled the buffer.
"""

import ctypes

from ...errors import BackendError
from .libraries import load_library

NCCL_FLOAT32 = 7   # ncclDataType_t ncclFloat32 (== ncclFloat)
NCCL_SUM = 0       # ncclRedOp_t ncclSum
UNIQUE_ID_BYTES = 128


class UniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_char * UNIQUE_ID_BYTES)]


class NcclCommunicator:
    """One NCCL communicator over the ranks of an MPI communicator, one GPU per rank."""

    def __init__(self, mpi_comm, ops):
        self.lib = load_library(["libnccl.so.2", "libnccl.so"], "nccl",
                                "NCCL (libnccl.so.2) was not found; multi-GPU training needs it "
                                "(pip install nvidia-nccl-cu13, or the system's libnccl2)")
        self.lib.ncclGetErrorString.restype = ctypes.c_char_p
        self.ops = ops
        unique = UniqueId()
        if mpi_comm.Get_rank() == 0:
            self._check("ncclGetUniqueId", self.lib.ncclGetUniqueId(ctypes.byref(unique)))
        unique = UniqueId.from_buffer_copy(mpi_comm.bcast(bytes(unique), root=0))
        self.comm = ctypes.c_void_p()
        self._check("ncclCommInitRank", self.lib.ncclCommInitRank(
            ctypes.byref(self.comm), ctypes.c_int(mpi_comm.Get_size()), unique,
            ctypes.c_int(mpi_comm.Get_rank())))

    def _check(self, name, status):
        if status != 0:
            message = self.lib.ncclGetErrorString(status).decode(errors="replace")
            raise BackendError(f"{name} failed: {message} (ncclResult {status})")

    def allreduce_sum_(self, array):
        """Sum a contiguous float32 GPU array over the ranks, in place."""
        stream = ctypes.c_void_p(self.ops.stream.handle)
        self._check("ncclAllReduce", self.lib.ncclAllReduce(
            ctypes.c_void_p(array.ptr), ctypes.c_void_p(array.ptr), ctypes.c_size_t(array.size),
            ctypes.c_int(NCCL_FLOAT32), ctypes.c_int(NCCL_SUM), self.comm, stream))
        return array
