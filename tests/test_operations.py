"""The operation set (engine/backends/operations.py): both backends implement exactly what it
declares, with its signatures."""

import inspect

import pytest

from engine.backends.cuda.backend import CudaBackend  # importable without a GPU (nothing loads)
from engine.backends.numpy_backend import NumpyBackend
from engine.backends.operations import Operations
from engine.errors import BackendError
from engine.network import Network
from engine.train import CapturedSteps, EagerSteps, iteration_runner

from helpers import write_cfg

BACKEND_CLASSES = [NumpyBackend, CudaBackend]


def public_members(cls):
    """The class-level public names: operations, properties, capabilities (instance attributes
    are a backend's own state, not part of the set)."""
    return {name for name in dir(cls) if not name.startswith("_")}


DECLARED = public_members(Operations)


def test_the_set_is_declared():
    abstract = Operations.__abstractmethods__
    assert {"conv_forward", "batchnorm_forward_train", "sgd_update", "name", "device_name"} <= abstract
    assert {"can_record", "capture", "last_cost"} <= DECLARED - abstract  # with defaults
    for name in DECLARED:
        member = inspect.getattr_static(Operations, name)
        doc = member.__doc__ if not isinstance(member, bool) else None
        assert name == "can_record" or (doc and len(doc.split()) >= 5), f"{name}: no docstring"


@pytest.mark.parametrize("backend_class", BACKEND_CLASSES, ids=lambda c: c.__name__)
def test_backend_implements_every_operation(backend_class):
    assert issubclass(backend_class, Operations)
    assert not backend_class.__abstractmethods__, "missing operations"


@pytest.mark.parametrize("backend_class", BACKEND_CLASSES, ids=lambda c: c.__name__)
def test_backend_adds_no_undeclared_public_member(backend_class):
    undeclared = public_members(backend_class) - DECLARED
    assert not undeclared, f"declare these in engine/backends/operations.py: {sorted(undeclared)}"


@pytest.mark.parametrize("backend_class", BACKEND_CLASSES, ids=lambda c: c.__name__)
def test_backend_signatures_are_the_declared_ones(backend_class):
    for name in sorted(DECLARED):
        declared = inspect.getattr_static(Operations, name)
        if not callable(declared) or isinstance(declared, property):
            continue
        implemented = inspect.getattr_static(backend_class, name)
        assert callable(implemented), name
        assert inspect.signature(implemented) == inspect.signature(declared), name


def test_a_backend_missing_an_operation_cannot_be_made():
    incomplete = type("Incomplete", (Operations,), {
        name: getattr(NumpyBackend, name) for name in Operations.__abstractmethods__
        if name != "conv_forward"})
    with pytest.raises(TypeError, match="conv_forward"):
        incomplete()


# ---- capabilities ----------------------------------------------------------------------------
def test_capabilities_have_defaults():
    ops = NumpyBackend()
    assert ops.can_record is False
    with pytest.raises(BackendError, match="cannot record"):
        ops.capture(lambda: None)
    assert CudaBackend.can_record is True


def test_recording_follows_the_declared_capability(tmp_path):
    """Recorded inference and recorded training iterations are used exactly where the backend
    declares can_record (no probing for a `capture` attribute)."""
    cfg = write_cfg(tmp_path / "small.cfg", {"batch": 2, "height": 4, "width": 4, "channels": 1},
                    "[connected]\noutput=3\nactivation=linear\n\n[softmax]\n")
    plain = Network(cfg, quiet=True)
    assert plain._inference is None and type(iteration_runner(plain, None)) is EagerSteps

    class RecordingBackend(NumpyBackend):
        can_record = True

    recording = Network(cfg, backend=RecordingBackend(), quiet=True)
    assert recording._inference is not None
    assert type(iteration_runner(recording, None)) is CapturedSteps
