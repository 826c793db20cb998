"""A network: the [net] options and the layers built from a cfg; forward, backward and update.

Layers run in cfg order. Each layer reads the outputs of the layers in its `input_indices`
(the previous one by default; -1 is the network input), and in the backward pass the deltas a
layer hands back are summed into those layers' deltas, so routes and shortcuts need nothing
special here.
"""

import numpy as np

from . import memory
from . import weights as weights_io
from .activations import CHANNEL_NAMES, NAMES as ACTIVATION_NAMES
from .backends import get_backend
from .config import read_cfg, warn_unused
from .constants import ALEXEYAB_BN_EPSILONS, PJREDDIE_BN_EPSILONS
from .errors import ConfigError, EngineError, NumericalError
from .layers import LAYER_TYPES

POLICIES = ("constant", "step", "steps", "exp", "poly", "sig", "sigmoid", "random", "sgdr")

# [net] keys Darknet reads for data augmentation and optimisers, accepted so Darknet's cfgs load
# without warnings. A detector's training reads its augmentation keys (engine.augmentation);
# classifiers ignore them, as every network ignores the optimiser keys. README lists them.
IGNORED_NET_KEYS = ("max_crop", "min_crop", "max_ratio", "min_ratio", "center", "clip", "angle",
                    "aspect", "saturation", "exposure", "hue", "jitter", "random", "notruth",
                    "time_steps", "adam", "B1", "B2", "eps", "flip", "mosaic", "cutmix", "blur",
                    "mixup", "gaussian_noise")


# AlexeyAB's sections the engine lacks, with why (the recurrent family keeps state across
# images; [contrastive] is a self-supervised loss; [detection] is YOLOv1's output layer).
UNSUPPORTED_SECTIONS = {
    "rnn": "recurrent layers are not implemented", "crnn": "recurrent layers are not implemented",
    "lstm": "recurrent layers are not implemented", "gru": "recurrent layers are not implemented",
    "conv_lstm": "recurrent layers are not implemented",
    "history": "recurrent layers are not implemented",
    "local": "the locally connected layer is not implemented",
}
# Keys AlexeyAB's parser reads in every layer (parse_network_cfg_custom), with their defaults.
# stopbackward and onlyforward are implemented (backward stops there / skips the layer); the others change training or loading
# and are refused when set.
GENERIC_LAYER_KEYS = {"dont_update": 0, "burnin_update": 0,
                      "train_only_bn": 0, "dontload": 0, "dontloadscales": 0, "clip": 0}
# [net] keys that change only AlexeyAB's training: training refuses them (inference is fine).
TRAINING_NET_KEYS = {"ema_alpha": 0, "label_smooth_eps": 0, "max_epochs": None, "contrastive": 0,
                     "contrastive_color": 0, "contrastive_jit_flip": 0,
                     # these change AlexeyAB's [yolo] loss (bad-label rejection, adversarial)
                     "equidistant_point": 0, "badlabels_rejection_percentage": 0,
                     "num_sigmas_reject_badlabels": 0, "adversarial_lr": 0}


class NetOptions:
    """The [net] section, typed, with Darknet's defaults (src/parser.c, parse_net_options)."""

    def __init__(self, section):
        s = self.section = section
        self.batch_size = s.positive_int("batch", 1)
        self.subdivisions = s.positive_int("subdivisions", 1)
        if self.batch_size % self.subdivisions:
            raise s.error(f"subdivisions={self.subdivisions} must divide batch={self.batch_size}",
                          "subdivisions")
        self.mini_batch = self.batch_size // self.subdivisions  # what Darknet calls net->batch
        self.height = s.int("height", 0, low=0)  # 0: not given (then `inputs` says the size)
        self.width = s.int("width", 0, low=0)
        self.channels = s.int("channels", 0, low=0)
        inputs = s.int("inputs", self.height * self.width * self.channels, low=0)
        if self.height * self.width * self.channels == 0:
            if inputs <= 0:
                raise s.error("needs height, width and channels (or inputs)")
            self.height, self.width, self.channels = 1, 1, inputs
        self.learning_rate = s.float("learning_rate", 0.001)
        self.momentum = s.float("momentum", 0.9)
        self.decay = s.float("decay", 0.0001)
        self.policy = s.str("policy", "constant")
        if self.policy not in POLICIES:
            raise s.error(f"policy={self.policy}: expected one of {', '.join(POLICIES)}", "policy")
        self.burn_in = s.int("burn_in", 0, low=0)
        self.power = s.float("power", 4.0)
        self.max_batches = s.int("max_batches", 0, low=0)
        if self.policy == "poly" and self.max_batches <= 0:
            raise s.error("policy=poly needs max_batches > 0 (the rate falls to 0 there)",
                          "max_batches" if s.has("max_batches") else "policy")
        self.step = self.scale = self.gamma = None
        self.steps, self.scales = [], []
        if self.policy == "step":
            self.step = s.positive_int("step", 1)
            self.scale = s.float("scale", 1.0)
        elif self.policy == "steps":
            self.steps = s.int_list("steps")
            self.scales = s.float_list("scales")
            if not self.steps or not self.scales or len(self.steps) != len(self.scales):
                raise s.error("policy=steps needs steps=... and scales=... lists of equal length",
                              "steps")
        elif self.policy in ("exp", "sig", "sigmoid"):  # sigmoid: AlexeyAB's name for sig
            self.gamma = s.float("gamma", 1.0)
            if self.policy != "exp":
                self.step = s.int("step", 1)
        elif self.policy == "sgdr":
            # AlexeyAB's cosine annealing with warm restarts (get_current_rate, SGDR); it parses
            # steps/scales for it too but does not use them.
            self.learning_rate_min = s.float("learning_rate_min", 0.00001)
            self.sgdr_cycle = s.require_positive("sgdr_cycle", s.int("sgdr_cycle", self.max_batches)) \
                if s.has("sgdr_cycle") or self.max_batches > 0 else 0
            if self.sgdr_cycle <= 0:
                raise s.error("policy=sgdr needs sgdr_cycle or max_batches > 0", "policy")
            self.sgdr_mult = s.require_positive("sgdr_mult", s.int("sgdr_mult", 2))
            s.str("steps"), s.str("scales")
        # AlexeyAB's static loss scaling (engine/loss_scaling.py); 1: none (its default)
        self.loss_scale = s.require_positive("loss_scale", s.float("loss_scale", 1.0))
        self.untrainable = {key: s.str(key) for key, default in TRAINING_NET_KEYS.items()
                            if s.has(key) and (default is None or float(s.float(key)) != default)}
        # AlexeyAB's detection preprocessing: 1 letterboxes, 0 stretches (None: not given).
        self.letter_box = s.int("letter_box") if s.has("letter_box") else None
        for key in IGNORED_NET_KEYS:
            s.str(key)

    @property
    def input_shape(self):
        return (self.channels, self.height, self.width)


# What only AlexeyAB's fork reads: a cfg with one of these is AlexeyAB's (see darknet_of).
ALEXEYAB_SECTIONS = {"sam", "scale_channels", "local_avgpool", "local_avg", "reorg3d", "implicit",
                     "empty", "silence", "gaussian_yolo", "contrastive", "conv_lstm", "history"}
ALEXEYAB_ACTIVATIONS = set(ACTIVATION_NAMES[14:]) | set(CHANNEL_NAMES)
ALEXEYAB_KEYS = {"scale_x_y", "new_coords", "nms_kind", "beta_nms", "iou_loss", "iou_normalizer",
                 "cls_normalizer", "obj_normalizer", "iou_thresh", "max_delta", "weights_type",
                 "weights_normalization", "stride_x", "stride_y", "dilation", "share_index",
                 "antialiasing", "maxpool_depth", "stopbackward", "letter_box", "mosaic",
                 "cutmix", "ema_alpha", "group_id", "learning_rate_min", "sgdr_cycle",
                 "label_smooth_eps", "objectness_smooth", "counters_per_class",
                 "delta_normalizer", "iou_thresh_kind", "focal_loss"}


def darknet_of(sections):
    """'alexeyab' when the cfg uses a section, activation or key only AlexeyAB's fork reads,
    else 'pjreddie'. The two differ in inference batch norm (AlexeyAB divides by
    sqrt(var + 1e-5), pjreddie by sqrt(var) + 1e-6: 4.5e-4 apart for a variance of 0.011), so
    the weights each trains are best run with its own rule."""
    for section in sections:
        if section.name in ALEXEYAB_SECTIONS or ALEXEYAB_KEYS.intersection(section.keys()):
            return "alexeyab"
        if section.peek("activation") in ALEXEYAB_ACTIVATIONS:
            return "alexeyab"
    return "pjreddie"


def read_generic_keys(section, layer):
    """AlexeyAB's keys of every layer: stopbackward kept, the others refused when set."""
    layer.stopbackward = section.bool("stopbackward", False)
    layer.onlyforward = section.bool("onlyforward", False)
    for key, default in GENERIC_LAYER_KEYS.items():
        if section.has(key) and section.float(key) != default:
            raise section.error(f"{key}={section.str(key)} is not supported", key)


class RecordedInference:
    """Inference replayed from a recording (CUDA graphs) on backends that can record: a batch
    size's first forward runs eagerly (it makes the convolution plans), its second is recorded,
    later ones copy the images into the recording's input buffer and replay it, which removes
    the host's per-operation cost that dominates small batches. The outputs that predict returns
    (the output layer's and the detection layers') start on their way to the host inside the
    recording (ops.output_reader), each as soon as its layer has made it, so a replay needs no
    other call to deliver them and an early head's copy overlaps the later layers. A recording
    reads the parameter arrays it was made with; when they are replaced (weights loaded, BN
    folded) it is made anew."""

    def __init__(self, net):
        self.net = net
        self.recordings = {}  # batch size -> (input buffer, recording, outputs, parameters)
        self.eager_done = set()
        self.read = net.read_by_predict

    def _parameters(self):
        return [array for layer in self.net.layers for array in layer.params.values()]

    def run(self, images, wanted):
        """A reader (ops.output_reader) of the outputs of layers `wanted` for `images`."""
        net, ops, size = self.net, self.net.ops, len(images)
        entry = self.recordings.get(size)
        if entry is not None and any(a is not b for a, b in zip(entry[3], self._parameters())):
            del self.recordings[size]  # the parameters were replaced: record again
            entry = None
        if entry is None and size not in self.eager_done:
            self.eager_done.add(size)
            net.forward(ops.asarray(images), train=False)
            return ops.output_reader([net.outputs[i] for i in wanted])
        if entry is None:
            buffer = ops.asarray(images)

            def forward():  # each output on its way to the host as soon as it is made
                readers = {}
                net.forward(buffer, train=False, deliver={
                    i: lambda y, i=i: readers.__setitem__(i, ops.output_reader([y]))
                    for i in self.read})
                return _Joined([readers[i] for i in self.read])
            # The eager pass's outputs go back to the pool as the recorded layers replace
            # theirs (each layer keeps its last output), so the recording can reuse them.
            net.outputs = None
            try:
                recording = ops.capture(forward)
            except EngineError:
                self.eager_done.add(size)  # cannot record here: stay eager
                net.forward(ops.asarray(images), train=False)
                return ops.output_reader([net.outputs[i] for i in wanted])
            entry = self.recordings[size] = (buffer, recording, net.outputs, self._parameters())
        else:
            ops.set_(entry[0], images)
        entry[1].replay()
        net.outputs = entry[2]
        if all(i in self.read for i in wanted):
            return _Picked(entry[1].result, [self.read.index(i) for i in wanted])
        return ops.output_reader([net.outputs[i] for i in wanted])  # after the replay's


class _Joined:
    """Several output_readers read as one: their outputs in order, finite if all are."""

    def __init__(self, readers):
        self.readers = readers

    def values(self):
        outputs, finite = [], True
        for reader in self.readers:  # (each waits for its own copies only)
            values, ok = reader.values()
            outputs += values
            finite = finite and ok
        return outputs, finite


class _Picked:
    """The outputs of `positions` of a recording's output_reader."""

    def __init__(self, reader, positions):
        self.reader, self.positions = reader, positions

    def values(self):
        outputs, finite = self.reader.values()
        return [outputs[p] for p in self.positions], finite


class Network:
    """Build with Network(cfg_path); then forward/backward/update, or use engine.train."""

    def __init__(self, cfg_path, backend=None, seed=0, quiet=False, darknet=None):
        """darknet: 'pjreddie' or 'alexeyab' chooses whose inference batch-norm rule to use;
        by default the cfg says (darknet_of)."""
        self.cfg_path = cfg_path
        sections = read_cfg(cfg_path)
        self.darknet = darknet or darknet_of(sections)
        if self.darknet not in ("pjreddie", "alexeyab"):
            raise ValueError(f"darknet={darknet!r}: expected 'pjreddie' or 'alexeyab'")
        self.bn_epsilons = ALEXEYAB_BN_EPSILONS if self.darknet == "alexeyab" else \
            PJREDDIE_BN_EPSILONS
        self.options = NetOptions(sections[0])
        self.rng = np.random.default_rng(seed)  # weight initialisation
        self.parameter_budget = memory.ParameterBudget()
        self.checked_batches = set()  # (batch, train) whose memory estimate fits
        self.layers = []
        self.layer_shapes = []
        for index, section in enumerate(sections[1:]):
            layer_class = LAYER_TYPES.get(section.name)
            if section.name in UNSUPPORTED_SECTIONS:
                raise ConfigError(f"{section.where()} {UNSUPPORTED_SECTIONS[section.name]}")
            if layer_class is None:
                known = ", ".join(sorted({c.type_name for c in LAYER_TYPES.values()}))
                raise ConfigError(f"{section.where()} unknown section type; supported: {known}")
            previous = self.layer_shapes[-1] if self.layer_shapes else self.options.input_shape
            layer = layer_class(section, index, [previous], self)
            read_generic_keys(section, layer)
            self.layers.append(layer)
            self.layer_shapes.append(tuple(int(v) for v in layer.out_shape))
        if not self.layers:
            raise ConfigError(f"{cfg_path}: the cfg has a [net] section but no layers")
        if not quiet:
            for section in sections:
                warn_unused(section)
        self.seen = 0
        # engine/loss_scaling.py's LossScaler while training with loss scaling (engine.train)
        self.loss_scaler = None
        self.folded = False  # fold_batchnorm: inference only from then on
        self._plan = None  # _concatenation_plan, made at the first inference forward
        self._plan_every_output = None  # the same without the pooling plan (forward)
        self._pools = None  # _pooling_plan, likewise
        self._chained = None  # _chains, likewise
        self._pooled = None  # _pooled_routes, likewise
        self._predicting = False  # inside predict: the pooling plan may skip outputs
        self.ops = backend if backend is not None else get_backend("cpu", seed=seed)
        self.check_memory(1)  # a network that cannot run one image is refused here, by its cfg
        for layer in self.layers:
            layer.place(self.ops)
        for layer in self.layers:  # AlexeyAB's share_index: one set of arrays for both layers
            if getattr(layer, "share_owner", None) is not None:
                layer._owner = self.layers[layer.share_owner]
                layer.share_parameters(layer._owner)
        self._inference = RecordedInference(self) if self.ops.can_record else None

    # ---- description --------------------------------------------------------------------------
    @property
    def input_shape(self):
        return self.options.input_shape

    @property
    def output_layer(self):
        """The last layer that is not a [cost] layer: its output is the network's output."""
        for layer in reversed(self.layers):
            if layer.type_name != "cost":
                return layer
        return self.layers[-1]

    @property
    def cost_layers(self):
        """The layers with a loss: one [softmax] or [cost] for a classifier, every [yolo] of a
        detector."""
        layers = [layer for layer in self.layers if getattr(layer, "has_cost", False)]
        if not layers:
            raise ConfigError(f"{self.cfg_path}: training needs a [softmax], [cost] or [yolo] layer")
        return layers

    @property
    def cost_layer(self):
        return self.cost_layers[-1]

    # What kind of model this is, for the commands that need one kind (detect, map, test).
    @property
    def read_by_predict(self):
        """The layers whose outputs predict returns without being asked for other layers: the
        output layer's and the detection layers' (a recorded inference sends these to the
        host)."""
        return sorted({self.output_layer.index} | {layer.index for layer in self.detection_layers})

    @property
    def detection_layers(self):
        """The layers whose outputs decode into boxes ([yolo], [gaussian_yolo], [region],
        YOLOv1's [detection]), in order."""
        return [layer for layer in self.layers if layer.outputs_boxes]

    @property
    def is_detector(self):
        return bool(self.detection_layers)

    @property
    def is_classifier(self):
        return not self.is_detector

    @property
    def task(self):
        return "detector" if self.is_detector else "classifier"

    @property
    def detected_classes(self):
        """The number of classes a detector's last head tells apart."""
        return self.detection_layers[-1].classes

    @property
    def training_task(self):
        """What truth training takes: 'detector' when every loss layer learns from boxes
        ([yolo], [region]), 'classifier' when none does (class labels)."""
        on_boxes = [layer.box_truth for layer in self.cost_layers]
        if all(on_boxes):
            return "detector"
        if any(on_boxes):
            raise ConfigError(f"{self.cfg_path}: has both [yolo] and [softmax]/[cost] losses; "
                              "train either a detector or a classifier")
        return "classifier"

    @property
    def truth_boxes(self):
        """Boxes per image in a detector's training truth rows (the [yolo] `max` key)."""
        return self.cost_layer.max_boxes

    @property
    def layers_with_weights(self):
        """How many layers a full .weights file covers: up to the last one with parameters."""
        return max((layer.index + 1 for layer in self.layers if layer.weight_order), default=0)

    # ---- memory ---------------------------------------------------------------------------------
    def reserve_parameters(self, layer, count):
        """Called by a layer before it draws `count` initial values: refuses (ConfigError naming
        the layer) parameters the host cannot hold, before numpy tries to allocate them."""
        self.parameter_budget.reserve(layer, count)

    def check_memory(self, batch, train=False):
        """Refuse, with the estimate and what to change, a batch this backend cannot hold."""
        if (batch, train) not in self.checked_batches:
            memory.check_network(self, batch, train, self.ops.available_memory(), self.ops.device_name)
            self.checked_batches.add((batch, train))

    # ---- computation --------------------------------------------------------------------------
    def forward(self, x, train=False, deliver=None):
        """x: backend array (batch, C, H, W). Returns the output layer's output; every layer's
        output is in self.outputs, except, in predict's forwards, those that the pooling plan
        skips (None there). deliver: {layer index: callable(output)}, each called as soon as
        that layer's output is made (a recorded inference starts its outputs' copies to the
        host there, beside the later layers)."""
        deliver = deliver or {}
        if not train and self.ops.computes_into_concatenations:
            return self._forward_inference(x, pooling=self._predicting, deliver=deliver)
        ops, outputs = self.ops, []
        for layer in self.layers:
            inputs = [x if j < 0 else outputs[j] for j in layer.input_indices]
            outputs.append(layer.forward(ops, inputs if layer.multi_input else inputs[0], train))
            if layer.index in deliver:
                deliver[layer.index](outputs[-1])
        self.outputs = outputs
        return outputs[self.output_layer.index]

    def _readers(self):
        """{layer index: the indexes of the layers that read its output}."""
        readers = {}
        for layer in self.layers:
            for j in layer.input_indices:
                readers.setdefault(j, []).append(layer.index)
        return readers

    def _pooled_routes(self):
        """{route index: the [maxpool] after it}: concatenations of inference convolutions
        (writes_into, each once) whose only reader is the plain [maxpool] that follows; each
        convolution pools its part straight into that maxpool's output (the pooling plan), so
        the route's output is never made. Made once."""
        routes = self._pooled
        if routes is None:
            routes, readers = {}, self._readers()
            for route, pool in zip(self.layers, self.layers[1:]):
                if (route.type_name == "route" and route.concatenates()
                        and route is not self.output_layer
                        and readers.get(route.index) == [pool.index]
                        and pool.type_name == "maxpool" and pool.pools_after_a_convolution()
                        and len(set(route.input_indices)) == len(route.input_indices)
                        and all(j >= 0 and self.layers[j].type_name == "convolutional"
                                and self.layers[j].writes_into() for j in route.input_indices)):
                    routes[route.index] = pool
            self._pooled = routes
        return routes

    def _concatenation_plan(self, pooling=True):
        """{convolution index: (route index, input position, channel offset)}: inference
        convolutions that write their output straight into the buffer of a [route] that
        concatenates them (one route each, the first), so the route copies nothing for them;
        their other readers read that channel slice. With `pooling` (predict), routes whose
        maxpool their inputs pool for (_pooled_routes), and those inputs, are left to the
        pooling plan. Made once for each."""
        plan = self._plan if pooling else self._plan_every_output
        if plan is None:
            plan = {}
            pooled = self._pooled_routes() if pooling else {}
            taken = {j for r in pooled for j in self.layers[r].input_indices}
            for route in self.layers:
                if (route.type_name != "route" or not route.concatenates()
                        or route.index in pooled):
                    continue
                for i, (j, at) in enumerate(zip(route.input_indices, route.channel_offsets())):
                    producer = self.layers[j] if j >= 0 else None
                    if (j not in plan and j not in taken and producer is not None
                            and producer.type_name == "convolutional"
                            and producer.writes_into()):
                        plan[j] = (route.index, i, at)
            if pooling:
                self._plan = plan
            else:
                self._plan_every_output = plan
        return plan

    def _pooling_plan(self):
        """{convolution index: (maxpool, channel offset, keep)}: inference convolutions that
        compute a plain [maxpool]'s output themselves (ConvolutionalLayer.forward_pooled):
        one (writes_into, not in the concatenation plan, not the network's output) whose only
        reader is the maxpool that follows (offset 0; its own output is not kept: None in
        `outputs`), or the inputs of a route that only that maxpool reads (_pooled_routes:
        each pools into its channels of the maxpool's output, at its offset in the route;
        kept where other layers read it). Made once."""
        plan = self._pools
        if plan is None:
            plan, readers = {}, self._readers()
            concatenated = self._concatenation_plan()
            for conv, pool in zip(self.layers, self.layers[1:]):
                if (conv.type_name == "convolutional" and conv.writes_into()
                        and conv.index not in concatenated and conv is not self.output_layer
                        and readers.get(conv.index) == [pool.index]
                        and pool.type_name == "maxpool" and pool.pools_after_a_convolution()):
                    plan[conv.index] = (pool, 0, False)
            for r, pool in self._pooled_routes().items():
                route = self.layers[r]
                for j, at in zip(route.input_indices, route.channel_offsets()):
                    keep = readers[j] != [r] or self.layers[j] is self.output_layer
                    plan[j] = (pool, at, keep)
            self._pools = plan
        return plan

    def _chains(self):
        """{first convolution's index: [(convolution, maxpool), ...]}: runs of two or more
        pooling-plan convolutions (offset 0, not kept), each pooled by the [maxpool] right
        after it, which only the next convolution of the run reads (that one reading nothing
        else): predict runs each run as one ops.conv_bias_maxpool_chain, whose backend may
        share the run's rows out to its threads once. Made once."""
        chains = self._chained
        if chains is None:
            chains, readers, pools = {}, self._readers(), self._pooling_plan()
            run = []
            for conv in self.layers:
                planned = pools.get(conv.index)
                if planned is None or planned[1:] != (0, False):
                    continue
                pool = planned[0]
                if (run and conv.index == run[-1][1].index + 1
                        and conv.input_indices == [run[-1][1].index]
                        and readers.get(run[-1][1].index) == [conv.index]):
                    run.append((conv, pool))
                    continue
                if len(run) > 1:
                    chains[run[0][0].index] = run
                run = [(conv, pool)]
            if len(run) > 1:
                chains[run[0][0].index] = run
            self._chained = chains
        return chains

    def _forward_inference(self, x, pooling=False, deliver=None):
        """forward(train=False), with the concatenation plan (a planned convolution allocates
        its route's output if no earlier part did and computes into its channels) and, if
        `pooling`, the pooling plan (planned convolutions compute their [maxpool]'s output,
        the first allocating it; a route they pool for is skipped: None in `outputs`)."""
        deliver = deliver or {}
        ops, outputs, batch = self.ops, [], int(x.shape[0])
        plan = self._concatenation_plan(pooling)
        pools = self._pooling_plan() if pooling else {}
        pooled_routes = self._pooled_routes() if pooling else {}
        buffers, placed = {}, {}  # route index -> its output; -> input positions written
        pooled = {}  # maxpool index -> its output, computed by the convolutions before it
        chains = self._chains() if pooling else {}
        chained = {}  # index -> the output of a layer of a chain being run (None but the last)
        for layer in self.layers:
            inputs = [x if j < 0 else outputs[j] for j in layer.input_indices]
            chain = chains.get(layer.index)
            where = plan.get(layer.index)
            planned_pool = pools.get(layer.index)
            if layer.index in chained:
                outputs.append(chained.pop(layer.index))
            elif chain is not None:
                last = chain[-1][1]
                y = ops.conv_bias_maxpool_chain(inputs[0], [conv.pooled_stage(pool)
                                                            for conv, pool in chain])
                chained = dict.fromkeys(range(layer.index + 1, last.index))
                chained[last.index] = last.forward_given(batch, y)
                outputs.append(None)
            elif planned_pool is not None:
                pool, at, keep = planned_pool
                out = pooled.get(pool.index)
                if out is None and pool.input_indices != [layer.index]:  # (a route's first)
                    out = ops.empty((batch,) + pool.out_shape, like=inputs[0])
                pooled[pool.index], y = layer.forward_pooled(ops, inputs[0], pool, out, at, keep)
                outputs.append(y)
            elif layer.index in pooled_routes:
                outputs.append(None)
            elif layer.index in pooled:
                outputs.append(layer.forward_given(batch, pooled.pop(layer.index)))
            elif where is not None:
                r, i, at = where
                route = self.layers[r]
                out = buffers.get(r)
                if out is None:
                    out = buffers[r] = ops.empty((batch,) + route.out_shape, like=inputs[0])
                outputs.append(layer.forward_into(ops, inputs[0], out, at))
                placed.setdefault(r, set()).add(i)
            elif layer.index in buffers:
                outputs.append(layer.forward_placed(ops, inputs, buffers.pop(layer.index),
                                                    placed.pop(layer.index)))
            else:
                outputs.append(layer.forward(ops, inputs if layer.multi_input else inputs[0],
                                             False))
            if layer.index in deliver:
                deliver[layer.index](outputs[-1])
        self.outputs = outputs
        return outputs[self.output_layer.index]

    def backward(self, seeds):
        """Propagate deltas back through every layer, accumulating parameter updates. `seeds`
        maps layer index -> delta of that layer's output (one per loss layer); a bare array is
        the delta of `cost_layer`. A seeded layer's delta also gathers what later layers hand
        back to it. While training with loss scaling (`loss_scaler`), each seed is first
        multiplied by the scale, in place."""
        ops = self.ops
        if not isinstance(seeds, dict):
            seeds = {self.cost_layer.index: seeds}
        deltas = [None] * len(self.layers)
        scale = self._loss_scale_state()
        for index, delta in seeds.items():
            if scale is not None:  # the costs were computed before: they stay unscaled
                ops.apply_loss_scale_(delta, scale)
            deltas[index] = delta
        for layer in reversed(self.layers):
            if layer.stopbackward:
                break  # AlexeyAB's stopbackward: this layer and those before it are frozen
            d, deltas[layer.index] = deltas[layer.index], None
            if layer.onlyforward:
                continue  # AlexeyAB's onlyforward: no backward pass for this layer
            if d is None:
                continue  # this layer's output does not reach the cost
            need = any(j >= 0 for j in layer.input_indices)
            result = layer.backward(ops, d, need)
            if not need:
                continue
            if not layer.multi_input:
                result = [result]
            handed = []  # the arrays given to earlier layers as their own
            for j, dx in zip(layer.input_indices, result):
                if j < 0 or dx is None:
                    continue
                if deltas[j] is None:
                    # Each layer owns the delta it is handed (changes it in place). A layer's
                    # deltas are arrays no one else holds, but a multi-input layer may hand back
                    # one array for several inputs: each after the first gets a copy.
                    deltas[j] = ops.copy(dx) if any(dx is h for h in handed) else dx
                    handed.append(dx)
                else:
                    ops.add_(deltas[j], dx)

    def update(self, learning_rate):
        """Every layer's SGD step from its accumulated gradients. With loss scaling, every
        gradient is checked first (into one flag on the backend: all or no layer steps), the
        steps divide them by the scale, and then the scale moves on for the next iteration
        (on the backend too: a recorded update holds it, and the host need not wait)."""
        o, ops = self.options, self.ops
        state = self._loss_scale_state()
        if state is not None:
            for layer in self.layers:
                for gradient in layer.updates.values():
                    ops.flag_non_finite_(state, gradient)
        for layer in self.layers:
            layer.update(ops, learning_rate, o.momentum, o.decay, o.batch_size, state)
        if state is not None:
            scaler = self.loss_scaler
            ops.update_loss_scale_(state, scaler.dynamic, scaler.growth_interval)

    def _loss_scale_state(self):
        """The backend's (S, overflow, good, skipped) array of the loss scaling in use, or
        None."""
        return self.loss_scaler.state if self.loss_scaler is not None else None

    def train_step(self, x, truth):
        """One forward/backward on a mini-batch (no update, `seen` unchanged). Every loss layer
        seeds its own delta, so deltas from several [yolo] heads sum where the branches meet.
        Returns the cost summed over the mini-batch; with several loss layers, their mean, the
        figure Darknet reports (calc_network_cost)."""
        self.forward(x, train=True)
        costs, seeds = [], {}
        for layer in self.cost_layers:
            cost, seeds[layer.index] = layer.cost(self.ops, truth)
            costs.append(cost)
        self.backward(seeds)
        # One loss layer: its cost as is (inside a CUDA-graph capture it is a placeholder).
        return costs[0] if len(costs) == 1 else sum(costs) / len(costs)

    # ---- convenience --------------------------------------------------------------------------
    def predict(self, images, batch_size=None, layers=None):
        """images: numpy (N, C, H, W) or (N, C*H*W) in [0, 1]. Returns numpy (N, outputs), the
        output layer's output; with `layers` (layer indexes), a list of those layers' outputs,
        each (N, C, H, W) (a detector's heads: net.detection_layers)."""
        images = np.asarray(images, dtype=np.float32).reshape((-1,) + self.input_shape)
        batch_size = batch_size or max(self.options.mini_batch, 1)
        wanted = [self.output_layer.index] if layers is None else [int(i) for i in layers]
        if any(not 0 <= i < len(self.layers) for i in wanted):
            raise ValueError(f"layers {layers}: the network has layers 0-{len(self.layers) - 1}")
        parts = []
        self.check_memory(min(batch_size, len(images)))
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            if self._inference:
                reader = self._inference.run(chunk, wanted)
            else:
                # the pooling plan may skip outputs other than the output layer's and the
                # detection layers'
                self._predicting = all(i in self.read_by_predict for i in wanted)
                try:
                    self.forward(self.ops.asarray(chunk), train=False)
                finally:
                    self._predicting = False
                reader = self.ops.output_reader([self.outputs[i] for i in wanted])
            outputs, finite = reader.values()
            if not finite:  # checked on the device: one flag copied back with the outputs
                self.raise_non_finite()
            parts.append(outputs)
        if not parts:
            parts = [[np.zeros((0,) + self.layer_shapes[i], np.float32) for i in wanted]]
        outputs = [part[0] if len(parts) == 1 else np.concatenate(part)
                   for part in zip(*parts)]
        if layers is not None:
            return [y.reshape((len(images),) + self.layer_shapes[i])
                    for y, i in zip(outputs, wanted)]
        return outputs[0].reshape(len(images), -1)

    def raise_non_finite(self):
        """Name the first layer whose output (in the last forward) is not finite."""
        for layer, output in zip(self.layers, self.outputs):
            if output is not None and not self.ops.all_finite(output):
                raise NumericalError(
                    f"{self.cfg_path}: layer {layer.index} [{layer.type_name}] ({layer.where()}) "
                    "computed NaN or infinite values; the weights are damaged or too large for "
                    "this input")
        raise NumericalError(f"{self.cfg_path}: the network computed NaN or infinite values")

    def fold_batchnorm(self):
        """Fold every convolutional/connected layer's batch norm into its weights (inference
        only: the network then computes exactly what it did with the rolling statistics, in one
        pass less per layer). Saving afterwards writes the layers without BN parameters."""
        for layer in self.layers:
            if hasattr(layer, "fold_batchnorm"):
                layer.fold_batchnorm(self.ops)
        # From here the parameters are read-only: a backend may keep work derived from them
        # (the CPU's Winograd filters); training a folded network is an error (engine.train).
        for layer in self.layers:
            for array in layer.params.values():
                self.ops.freeze_(array)
        self.folded = True
        self._plan = self._plan_every_output = None  # folded convolutions may now write into
        # their concatenations
        self._pools = None  # ... and pool for their maxpools
        self._pooled = None
        self._chained = None
        return self

    def load_weights(self, path):
        """Fill the layers from a Darknet .weights file; returns how many layers it covered."""
        return weights_io.load(self, path)

    def save_weights(self, path, cutoff=None):
        weights_io.save(self, path, cutoff)
