"""Semantic constants live in engine/constants.py only: the backends, the activations and the
kernels' sources hold none of their values as literals, and the kernels get them at build time."""

import ast
import glob
import os
import re

import numpy as np
import pytest

from engine import constants
from engine.backends.cuda.kernels import COMPILE_OPTIONS, KERNEL_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The values a literal must not repeat (0.5, 1, 4... are structure, not constants).
VALUES = {name: value for name, value in vars(constants).items()
          if name.isupper() and isinstance(value, float) and value not in (0.0, 0.5, 1.0)}
# The modules that compute with the constants (cfg defaults elsewhere may share a value by chance:
# network.py's learning_rate=0.001).
PYTHON_MODULES = ["engine/activations.py", "engine/backends/numpy_backend.py",
                  "engine/backends/operations.py", "engine/backends/cuda/backend.py",
                  "engine/backends/cuda/cudnn.py", "engine/backends/cuda/cudnn_graph.py",
                  "engine/layers/base.py", "engine/onnx_export.py"]
KERNEL_SOURCES = sorted(glob.glob(os.path.join(KERNEL_DIR, "*.cu")) +
                        glob.glob(os.path.join(KERNEL_DIR, "*.cuh")))


def repeated(number):
    return [name for name, value in VALUES.items()
            if np.float32(number) == np.float32(value) or number == value]


def test_the_constants_are_darknets():
    assert constants.PJREDDIE_BN_EPSILONS == (0.0, 1e-6)
    assert constants.ALEXEYAB_BN_EPSILONS == (1e-5, 0.0)
    assert (constants.BN_TRAINING_EPSILON, constants.BN_MOMENTUM) == (1e-5, 0.01)
    assert constants.LEAKY_SLOPE == 0.1


@pytest.mark.parametrize("path", PYTHON_MODULES)
def test_python_modules_do_not_repeat_a_constant(path):
    with open(os.path.join(ROOT, path)) as handle:
        tree = ast.parse(handle.read())
    found = [(node.lineno, node.value, repeated(node.value)) for node in ast.walk(tree)
             if isinstance(node, ast.Constant) and isinstance(node.value, float)
             and repeated(node.value)]
    assert not found, f"{path}: use engine/constants.py for {found}"


@pytest.mark.parametrize("path", KERNEL_SOURCES, ids=os.path.basename)
def test_kernels_do_not_repeat_a_constant(path):
    with open(path) as handle:
        code = re.sub(r"/\*.*?\*/|//[^\n]*", " ", handle.read(), flags=re.DOTALL)
    literals = re.findall(r"(?<![\w.])(\d+\.\d*(?:[eE][-+]?\d+)?|\d*\.\d+(?:[eE][-+]?\d+)?|"
                          r"\d+[eE][-+]?\d+)f?\b", code)
    found = [(text, repeated(float(text))) for text in literals if repeated(float(text))]
    assert not found, f"{path}: take these from engine/constants.py KERNEL_DEFINES: {found}"


def test_kernels_are_compiled_with_every_constant_they_use():
    names = set()
    for path in KERNEL_SOURCES:
        with open(path) as handle:
            names |= set(re.findall(r"\b[A-Z][A-Z0-9_]+\b", handle.read()))
    defined = {option[2:].split("=")[0] for option in COMPILE_OPTIONS if option.startswith("-D")}
    assert defined == set(constants.KERNEL_DEFINES)
    assert defined <= names, f"defined but unused by kernels/: {sorted(defined - names)}"
    for name, literal in constants.KERNEL_DEFINES.items():
        # the literal is the float32 value the numpy backend computes with, exactly
        value = getattr(constants, name, None)
        if value is not None:
            assert np.float32(literal.rstrip("f")) == np.float32(value), name
