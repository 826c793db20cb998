"""Shared test fixtures: paths to the repository, the bundled golden files and MNIST, `ops`,
each backend in turn (one per test module; the GPU's under the `gpu` marker), and the engine's
disk cache moved into the session's temporary folder."""

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden")
CFG = os.path.join(ROOT, "cfg")


@pytest.fixture(scope="session", autouse=True)
def engine_cache_dir(tmp_path_factory):
    """The engine's disk cache (compiled cuDNN plans) in a folder of this test session, never
    the user's: set for the whole session, subprocesses included."""
    folder = str(tmp_path_factory.mktemp("engine-cache"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ENGINE_CACHE_DIR", folder)
        yield folder


@pytest.fixture(scope="module", params=["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def ops(request):
    if request.param == "cpu":
        from engine.backends.numpy_backend import NumpyBackend

        return NumpyBackend(seed=0)
    from engine.backends.cuda import CudaBackend

    return CudaBackend(device=0, seed=0)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """A small MNIST detection set (12 training scenes of 40x40), its .data file's path."""
    from engine import cli

    folder = tmp_path_factory.mktemp("scenes")
    cli.main(["mnist-detection", str(folder), "--train", "12", "--valid", "2", "--size", "40",
              "--min-digit", "10", "--max-digit", "20"])
    return str(folder / "mnist-detect.data")


def gpu_available():
    try:
        import pycuda.driver as cuda

        cuda.init()
        return cuda.Device.count() > 0
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if "slow" not in (config.option.markexpr or ""):
        skip = pytest.mark.skip(reason="slow: run with -m slow")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)
    if any("gpu" in item.keywords for item in items) and not gpu_available():
        skip = pytest.mark.skip(reason="no usable NVIDIA GPU (pycuda, driver and device needed)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
