"""A Darknet-style neural-network engine: Darknet .cfg networks, trained and run on numpy or CUDA.

    import engine
    net = engine.load("cfg/mnist.cfg", "weights/mnist.weights")
    probabilities = net.predict(images)       # images: (N, 1, 28, 28) in [0, 1]
"""

from .errors import (BackendError, ConfigError, DataError, EngineError, NumericalError,
                     WeightsError)
from .network import Network

__all__ = ["load", "Network", "EngineError", "ConfigError", "WeightsError", "DataError",
           "BackendError", "NumericalError"]


def load(cfg_path, weights_path=None, backend="cpu", device=0, seed=0, quiet=False,
         allow_tf32=False, darknet=None, precision=None):
    """Build the network described by `cfg_path` on `backend` ('cpu' or 'gpu'), and load
    `weights_path` into it if given. `darknet` ('pjreddie' or 'alexeyab') picks whose inference
    batch-norm rule to use; by default the cfg tells (network.darknet_of). `precision`: 'fp32'
    (default), 'tf32', 'fp16' or 'bf16' on the GPU (engine/precision.py)."""
    from .backends import get_backend

    ops = get_backend(backend, device=device, seed=seed, allow_tf32=allow_tf32,
                      precision=precision)
    net = Network(cfg_path, backend=ops, seed=seed, quiet=quiet, darknet=darknet)
    if weights_path:
        net.load_weights(weights_path)
    return net
