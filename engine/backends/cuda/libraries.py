"""Finding NVIDIA's shared libraries: the system loader's search path first, then the copies that
pip's nvidia-* wheels keep under site-packages/nvidia/<package>/lib."""

import ctypes
import glob
import os
import sys

from ...errors import BackendError


def load_library(names, wheel_package, missing):
    """The first of `names` (sonames or glob patterns) that loads; BackendError(`missing`, with
    the loader's first complaint) when none does."""
    candidates = []
    for name in names:
        candidates.append(name)
        for root in sys.path:
            candidates += sorted(glob.glob(os.path.join(root, "nvidia", wheel_package, "lib", name)))
    errors = []
    for path in candidates:
        try:
            return ctypes.CDLL(path)
        except OSError as error:
            errors.append(str(error))
    raise BackendError(f"{missing}; tried: {errors[0] if errors else 'nothing'}")
