"""AlexeyAB's cfg folder (../shared/darknet-cfg/alexeyab): which cfgs load, why the others are
refused, the .weights sizes the cfgs imply against AlexeyAB's published files, and the [net] and
parsing rules its cfgs rely on (atoi integers, policy=sgdr)."""

import math
import os
import sys

import numpy as np
import pytest

from engine.config import _parse_int
from engine.errors import ConfigError
from engine.network import Network

from conftest import ROOT
from helpers import write_cfg

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import alexeyab_cfgs  # noqa: E402

FOLDER = alexeyab_cfgs.FOLDER
needs_folder = pytest.mark.skipif(not os.path.isdir(FOLDER), reason="no AlexeyAB cfg folder here")

# cfg -> (parameters, bytes) the published AlexeyAB files have: yolov4.weights and
# yolov4-tiny.weights are 257717640 and 24251276 bytes (the 20-byte header, then float32s).
PUBLISHED = {"yolov4.cfg": 257717640, "yolov4-tiny.cfg": 24251276}
# What the cfgs imply for other AlexeyAB models (checked against nothing published here).
EXPECTED = {"yolov7-tiny.cfg": 24967560, "yolov7.cfg": 147898248, "yolov4-csp.cfg": 211944840,
            "efficientnet_b0.cfg": 19560180, "yolov4-sam-mish-csp-reorg-bfm.cfg": 246251912,
            "resnet152_trident.cfg": 262316084}
REFUSED = {
    "crnn.train.cfg": "recurrent", "gru.cfg": "recurrent", "lstm.train.cfg": "recurrent",
    "rnn.cfg": "recurrent", "rnn.train.cfg": "recurrent",
    "yolov3-tiny_occlusion_track.cfg": "recurrent",
    "darknet53_448_xnor.cfg": "xnor=1", "tiny-yolo_xnor.cfg": "xnor=1",
    "yolov3-tiny_xnor.cfg": "xnor=1", "yolo9000.cfg": "tree=",
    "cspx-p7-mish.cfg": "mask index 16", "cspx-p7-mish_hp.cfg": "anchors lists 31 numbers",
}


@needs_folder
@pytest.mark.parametrize("name", sorted(PUBLISHED) + sorted(EXPECTED))
def test_weights_file_size_from_the_cfg(name):
    """The .weights size computed from the cfg equals AlexeyAB's published file."""
    from engine.models import weights_file_bytes

    net = alexeyab_cfgs.load_without_weights(os.path.join(FOLDER, name))
    assert weights_file_bytes(net) == PUBLISHED.get(name, EXPECTED.get(name))


@needs_folder
@pytest.mark.parametrize("name", ["rnn.cfg", "gru.cfg", "darknet53_448_xnor.cfg",
                                  "tiny-yolo_xnor.cfg", "yolo9000.cfg"])
def test_refused_cfgs_name_the_line_and_why(name):
    import re

    with pytest.raises(ConfigError) as error:
        alexeyab_cfgs.load_without_weights(os.path.join(FOLDER, name))
    assert re.search(rf"{re.escape(name)}:\d+: \[\w+\] .*{REFUSED[name]}", str(error.value))


@needs_folder
@pytest.mark.slow
def test_every_cfg_loads_or_is_refused_for_a_known_reason():
    """All 87 cfgs: 75 load without an unused key that changes computation; the 12 others are
    the recurrent family, xnor, tree= and two cfgs whose own [yolo] sections are
    inconsistent."""
    import re

    rows = alexeyab_cfgs.survey()
    assert len(rows) == 87
    for name, status, reason, params, size, unused in rows:
        if name in REFUSED:
            assert status == "refused" and re.search(REFUSED[name], reason), (name, reason)
        else:
            assert status == "loads", (name, reason)
            # only keys AlexeyAB's own parser does not read either, or [net]'s `seen`
            assert unused in ("", "[net] seen", "[yolo] beta1, [yolo] uc_normalizer"), (name, unused)


# ---- integers as atoi reads them -----------------------------------------------------------------
@pytest.mark.parametrize("text,value", [("40", 40), ("40#32", 40), ("688#576", 688), ("-3", -3),
                                        ("+2", 2), ("3.0", 3), ("1e3", 1000), ("7;x", 7)])
def test_integers_follow_atoi(text, value):
    assert _parse_int(text) == value


@pytest.mark.parametrize("text", ["abc", "", "#3", "2.5", "x40"])
def test_integers_without_leading_digits_or_with_a_fraction_are_refused(text):
    with pytest.raises(ValueError):
        _parse_int(text)


def test_a_cfg_with_an_inline_comment_after_filters_loads(tmp_path):
    path = write_cfg(tmp_path / "c.cfg", {"batch": 1, "width": 4, "height": 4, "channels": 3},
                     "[convolutional]\nfilters=4#8\nsize=1\ngroups=1\t#2\nactivation=linear")
    assert Network(path, quiet=True).layers[0].out_shape == (4, 4, 4)


# ---- [net] ----------------------------------------------------------------------------------------
def sgdr_reference(batch_num, rate, rate_min, cycle, mult):
    start = 0
    while start + cycle < batch_num:
        start += cycle
        cycle *= mult
    return rate_min + 0.5 * (rate - rate_min) * (1 + math.cos((batch_num - start) * 3.14159265 / cycle))


def test_sgdr_policy_is_alexeyabs(tmp_path):
    from engine.train import learning_rate

    path = write_cfg(tmp_path / "s.cfg", {"batch": 1, "width": 4, "height": 4, "channels": 1,
                                          "learning_rate": 0.1, "policy": "sgdr", "sgdr_cycle": 10,
                                          "sgdr_mult": 3, "learning_rate_min": 0.001,
                                          "max_batches": 1000, "burn_in": 4},
                     "[convolutional]\nfilters=1\nsize=1")
    options = Network(path, quiet=True).options
    for batch_num in range(4, 200):
        assert learning_rate(options, batch_num) == pytest.approx(
            sgdr_reference(batch_num, 0.1, 0.001, 10, 3), rel=1e-9)
    assert learning_rate(options, 10) == pytest.approx(0.001)  # the end of the first cycle
    assert learning_rate(options, 11) > 0.09  # a warm restart
    defaults = write_cfg(tmp_path / "d.cfg", {"batch": 1, "width": 4, "height": 4, "channels": 1,
                                              "policy": "sgdr", "max_batches": 50},
                         "[convolutional]\nfilters=1\nsize=1")
    options = Network(defaults, quiet=True).options
    assert (options.sgdr_cycle, options.sgdr_mult, options.learning_rate_min) == (50, 2, 1e-5)


def test_net_training_only_keys_refuse_training(tmp_path):
    from engine.data import Dataset
    from engine.train import train

    path = write_cfg(tmp_path / "e.cfg", {"batch": 2, "width": 2, "height": 2, "channels": 1,
                                          "ema_alpha": 0.9998, "max_batches": 1},
                     "[connected]\noutput=2\n\n[softmax]")
    net = Network(path, quiet=True)  # inference is fine
    dataset = Dataset(np.zeros((2, 1, 2, 2), np.float32), np.zeros(2, int), 2, "d")
    with pytest.raises(ConfigError, match=r"e\.cfg:\d+: \[net\] ema_alpha=0.9998"):
        train(net, dataset, str(tmp_path), stream=open(os.devnull, "w"))


@needs_folder
@pytest.mark.parametrize("name,total", [("yolov4.cfg", "128.459"), ("yolov4-tiny.cfg", "6.910"),
                                        ("yolov7-tiny.cfg", "5.802"), ("efficientnet_b0.cfg", "0.915")])
def test_total_bflops_equal_alexeyabs(name, total):
    """`engine info`'s total equals the "Total BFLOPS" AlexeyAB's parser prints for the cfg
    (convolutions, pooling and shortcuts counted as it counts them)."""
    from engine.models import layer_table

    net = alexeyab_cfgs.load_without_weights(os.path.join(FOLDER, name))
    assert layer_table(net).splitlines()[-1] == f"Total BFLOPs {total}"


# ---- whose batch-norm rule ------------------------------------------------------------------------
def test_inference_batch_norm_follows_the_darknet_the_cfg_comes_from(tmp_path):
    """AlexeyAB's Darknet normalises with sqrt(var + 1e-5), pjreddie's with sqrt(var) + 1e-6; a
    cfg with AlexeyAB-only keys (here an activation) gets AlexeyAB's rule, others pjreddie's, and
    `darknet=` overrides. With a variance of 0.011 (as in Darknet-trained weights) the two rules
    are 4.5e-4 apart, more than the golden tolerance."""
    import engine
    from engine.network import darknet_of
    from engine.config import read_cfg

    results = {}
    for activation in ("leaky", "mish"):
        path = write_cfg(tmp_path / f"{activation}.cfg", {"batch": 1, "width": 1, "height": 1,
                                                          "channels": 1},
                         f"[convolutional]\nbatch_normalize=1\nfilters=1\nsize=1\n"
                         f"activation={activation}")
        for darknet in (None, "pjreddie", "alexeyab"):
            net = engine.load(path, quiet=True, darknet=darknet)
            layer = net.layers[0]
            layer.params["weights"][...] = 1
            layer.params["rolling_variance"][...] = 0.011
            layer.params["rolling_mean"][...] = 0
            layer.params["scales"][...] = 1
            y = float(net.forward(np.full((1, 1, 1, 1), 0.5, np.float32))[0, 0, 0, 0])
            pre = 0.5 / np.sqrt(0.011 + 1e-5) if (darknet or darknet_of(read_cfg(path))) == \
                "alexeyab" else 0.5 / (np.sqrt(0.011) + 1e-6)
            want = pre if activation == "leaky" else pre * np.tanh(np.log1p(np.exp(pre)))
            assert y == pytest.approx(want, rel=1e-6), (activation, darknet)
            results[activation, darknet] = y
            folded = engine.load(path, quiet=True, darknet=darknet)
            folded.layers[0].params = {k: v.copy() for k, v in layer.params.items()}
            folded.fold_batchnorm()
            assert float(folded.forward(np.full((1, 1, 1, 1), 0.5, np.float32))[0, 0, 0, 0]) == \
                pytest.approx(y, rel=1e-6)
    assert results["leaky", None] == results["leaky", "pjreddie"]
    assert results["mish", None] == results["mish", "alexeyab"]
    assert abs(results["leaky", "pjreddie"] / results["leaky", "alexeyab"] - 1) > 4e-4
