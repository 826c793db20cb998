"""The package's layering, read from the source (ast, every import, also those inside
functions): no import cycles, and each level imports only what lies below it.

    cli, train, distributed, models, validation, anchors ...    (applications)
    detection, evaluation | data, detection_data, augmentation  (post-processing | data)
    network, weights, multiscale                                 (the network)
    layers/*                                                     (layer semantics)
    backends/* (the operation set)  boxes, images, activations   (below the layers)
    config, errors, memory                                       (everyone's)
"""

import ast
import importlib
import os

import pytest

from conftest import ROOT

PACKAGE = os.path.join(ROOT, "engine")


def module_files():
    """{dotted module name: path} of every module in engine/."""
    found = {}
    for folder, _, names in os.walk(PACKAGE):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[dotted.removesuffix(".__init__")] = path
    return found


MODULES = module_files()


def imported_modules(module, path):
    """The engine modules `module` imports anywhere in its source (relative imports resolved;
    `from package import name` counts as the submodule when `name` is one)."""
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                     for alias in node.names]
        else:
            continue
        for name in names:
            while name not in MODULES and "." in name:
                name = name.rpartition(".")[0]  # engine.x.function -> engine.x
            if name in MODULES and name != module:
                targets.add(name)
    return targets


GRAPH = {module: imported_modules(module, path) for module, path in MODULES.items()}


def cycles(graph):
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def in_group(module, prefixes):
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def violations(importers, forbidden):
    return sorted((module, target) for module in MODULES if in_group(module, importers)
                  for target in GRAPH[module] if in_group(target, forbidden))


# Modules under engine/backends/ that declare the operation set (its interface, the types its
# operations take) without implementing it: the only part of backends/ a layer may import.
# yolo_truths: apply_truth_events_'s parameters (TruthLoss), plan and statistics, and the events'
# rules its numpy version applies, which the [yolo] layers' host path (truth_thresh < 1) shares
OPERATION_SET_MODULES = ["engine.backends.operations", "engine.backends.views",
                         "engine.backends.yolo_truths"]

ABOVE_THE_NETWORK = ["engine.cli", "engine.train", "engine.distributed", "engine.models",
                     "engine.onnx_export", "engine.validation", "engine.evaluation",
                     "engine.anchors", "engine.chart", "engine.mnist_detection",
                     "engine.detection", "engine.detection_data", "engine.data",
                     "engine.augmentation", "engine.multiscale"]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_imports(module):
    """Each module imports on its own (the CUDA ones too: pycuda is imported only when a GPU
    backend is made)."""
    importlib.import_module(module)


def test_the_reader_sees_the_imports():
    """The graph is read right: known edges, relative and absolute, nested in functions too."""
    assert "engine.layers.base" in GRAPH["engine.layers.convolutional"]
    assert "engine.activations" in GRAPH["engine.layers.base"]
    assert "engine.boxes" in GRAPH["engine.layers.yolo"]
    assert "engine.backends.cuda.graph" in GRAPH["engine.backends.cuda.backend"]  # in a method
    assert "engine.detection_data" in GRAPH["engine.data"]  # in a method
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert cycles(GRAPH) == []


def test_layers_depend_on_the_operation_set_and_cfg_options_only():
    """A layer gets its backend (`ops`) and its cfg section handed in; it imports no backend,
    no application module (detection, data, cli, training), not even the network."""
    assert [(layer, target) for layer, target in violations(
        ["engine.layers"], ["engine.backends", "engine.detection", "engine.detection_data",
                            "engine.data", "engine.cli", "engine.train", "engine.network"])
        if target not in OPERATION_SET_MODULES] == []
    allowed = ["engine.layers", "engine.activations", "engine.boxes", "engine.errors",
               "engine.config", "engine.constants", "engine.batchnorm_rule"] + OPERATION_SET_MODULES
    assert sorted({target for module in MODULES if in_group(module, ["engine.layers"])
                   for target in GRAPH[module] if not in_group(target, allowed)}) == []


def test_backends_know_no_layer_network_or_application():
    assert violations(["engine.backends"], ["engine.layers", "engine.network", "engine.weights"]
                      + ABOVE_THE_NETWORK) == []


def test_the_network_sits_below_data_detection_training_and_the_cli():
    assert violations(["engine.network", "engine.weights", "engine.layers"],
                      ABOVE_THE_NETWORK) == []


def test_training_and_distribution_hold_no_backend_specific_code():
    """distributed.py and train.py ask the backend (ops.collectives, capture) instead of
    importing one."""
    assert violations(["engine.distributed", "engine.train"], ["engine.backends"]) == []
