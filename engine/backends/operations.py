"""The operation set: every operation layers, the network and training call on a backend `ops`.

Declared here once; `NumpyBackend` (numpy_backend.py) and `CudaBackend` (cuda/backend.py)
subclass `Operations` and implement each abstract method with these signatures and semantics,
and tests/test_operations.py checks both against plain numpy. A backend that misses one cannot
be instantiated, and tests/test_operations.py fails when a backend has a public member this
class does not declare: a new operation is declared here first (see README, "Architecture").

Conventions, for every operation:
- An *array* is the backend's own float32 array (numpy.ndarray or PyCUDA GPUArray), C-ordered
  NCHW to the caller (on a GPU backend in fp16 or bf16 precision, engine/precision.py, the
  activations and deltas its operations make are stored in that type; parameters and host data
  stay float32, and an operation converts an operand of the other type itself): (B, C, H, W) images, (B, N, 1, 1) vectors. Where an operation says "new",
  it returns a new array and leaves its inputs unchanged; names ending in `_` change their first
  array argument in place and return it. The numpy backend may lay a 4-D array out
  batch-innermost in memory (numpy_backend.py): callers index and reshape only through
  operations, never through the layout.
- Darknet's sign convention: a *delta* is the negative gradient of the loss. Backward operations
  *accumulate* parameter gradients into the `*_updates` arrays they are given (cuDNN's beta = 1)
  and only `sgd_update` changes parameters.
- Scalars (strides, sizes, factors) are Python numbers; shapes are tuples of ints.
- Semantic constants (epsilons, momentum, activation slopes) come from engine/constants.py.

Capabilities are declared as class attributes with defaults here, so callers ask
(`ops.can_record`) instead of probing with hasattr.
"""

from abc import ABC, abstractmethod

from ..constants import PJREDDIE_BN_EPSILONS
from ..errors import BackendError
from . import views


class Operations(ABC):
    """The operations a backend implements (abstract) and the capabilities it declares."""

    # ---- capabilities (defaults; a backend overrides what it can do) ---------------------------
    can_record = False
    """True when `capture` works: a whole step can be recorded once and replayed (CUDA graphs).
    Network (recorded inference) and train.py (recorded iterations) use it only then."""

    precision = "fp32"
    """The precision this backend computes in (engine/precision.py): 'fp32' on the CPU; 'fp32',
    'tf32', 'fp16' or 'bf16' on the GPU."""

    computes_into_concatenations = False
    """True when conv_bias_forward_into_ computes straight into the route's buffer, so that
    Network's inference plan saves the route's copies (numpy). Otherwise the plan would only
    move the same copies earlier, and inference runs the plain forward."""

    # ---- identity ------------------------------------------------------------------------------
    @property
    @abstractmethod
    def name(self):
        """'cpu' or 'gpu': the name `get_backend` knows this backend by."""

    @property
    @abstractmethod
    def device_name(self):
        """The device in words for messages ('CPU', 'GPU 0 (NVIDIA H200)')."""

    @abstractmethod
    def seed(self, seed):
        """Restart the backend's random source (dropout masks) from the integer `seed`."""

    # ---- memory --------------------------------------------------------------------------------
    @abstractmethod
    def available_memory(self):
        """Bytes this backend can still allocate (an int), capped by ENGINE_MEMORY_LIMIT; checked
        before a network runs."""

    @abstractmethod
    def asarray(self, host):
        """A float32 array on this backend holding `host` (any array-like; converted to float32).
        May return `host` itself when it already is such an array."""

    @abstractmethod
    def host_empty(self, shape):
        """An uninitialised float32 numpy array of `shape` that asarray and set_ copy in fastest
        (page-locked on a GPU: 2.5 instead of 24 ms for a 133 MB batch on an H200), for a data
        loader to fill. Slow to make: allocate a few and reuse them (engine.data.HostBatches).
        Once passed to asarray or set_, leave it unchanged until the backend's work that reads
        it is finished (the copy may still be in flight)."""

    @abstractmethod
    def to_host(self, array):
        """A float32 numpy array with `array`'s values (the backend's work so far is finished
        first)."""

    @abstractmethod
    def to_host_async(self, array):
        """Start copying a small array's values to the host without waiting for the backend's
        work: returns a HostRead (below) whose value() is what to_host would have returned once
        the work issued so far has run. A GPU backend copies into page-locked memory on its
        stream and records an event; numpy reads at once."""

    @abstractmethod
    def set_(self, dst, host, early=False):
        """Copy host values (dst.size of them, any shape) into the existing array dst (in its
        type: float32, or int32 for int_array's), in place;
        dst keeps its identity (a fixed buffer a recording reads). Returns dst. early=True: the
        copy may begin before the work already issued ends (a GPU backend copies over the bus
        into a buffer beside dst, on a second stream, while it computes), dst being written in
        order all the same; `host` must then stay unchanged until that work has ended."""

    @abstractmethod
    def all_finite(self, array):
        """True when no value of `array` is NaN or infinite (checked where the array lives: a
        GPU backend copies one flag, not the array)."""

    @abstractmethod
    def zeros(self, shape, like=None):
        """A new array of `shape`, all zero: float32, or of like's dtype (float64 in the gradient
        checks)."""

    @abstractmethod
    def empty(self, shape, like=None):
        """A new uninitialised array of `shape` (written whole before it is read), float32 or of
        like's dtype."""

    @abstractmethod
    def copy(self, array):
        """A new array equal to `array`."""

    @abstractmethod
    def reshape(self, array, shape):
        """`array`'s values as `shape` (same size), in row-major NCHW order; may share memory."""

    @abstractmethod
    def add_(self, dst, src):
        """dst += src elementwise (same shape), in place; returns dst. Sums the deltas that reach
        one layer along several paths."""

    @abstractmethod
    def synchronize(self):
        """Wait until every operation issued so far has finished (for timing)."""

    @abstractmethod
    def freeze_(self, array):
        """Mark a parameter array read-only from here on (inference): the backend may cache work
        derived from it. Returns array."""

    # ---- activation and bias -------------------------------------------------------------------
    @abstractmethod
    def activate_(self, x, activation, view=None):
        """x = act(x) elementwise for one of activations.NAMES, in place, on all of x or only on
        the elements a View (views.py) holds; returns x."""

    @abstractmethod
    def activation_backward_(self, y, delta, activation):
        """delta *= act'(x), the derivative written through the activation's output y
        (activations.gradient); y and delta of one shape; delta in place, returned."""

    @abstractmethod
    def activation_input_backward_(self, x, delta, activation):
        """delta *= act'(x) from the activation's input x, for activations.INPUT_GRADIENT
        (mish, swish, hard_mish, gelu); delta in place, returned."""

    @abstractmethod
    def normalize_channels(self, x, activation):
        """AlexeyAB's activations across the channels of each position (activations.CHANNEL_NAMES)
        of a (B, C, H, W) x: a new array (activations.normalize_channels)."""

    @abstractmethod
    def normalize_channels_backward_(self, x, delta, activation):
        """delta := the delta through normalize_channels at its input x (both (B, C, H, W));
        delta in place, returned."""

    @abstractmethod
    def add_bias_(self, y, biases, activation="linear"):
        """y = act(y + biases[c]) for y (B, C, ...) and biases (C,), in place, in one pass;
        returns y."""

    @abstractmethod
    def bias_backward(self, delta, bias_updates):
        """bias_updates (C,) += the sum of delta (B, C, ...) over all axes but the channel's.
        Returns nothing."""

    @abstractmethod
    def scale_(self, x, factor):
        """x *= factor (a Python number), in place; returns x."""

    # ---- convolution and fully connected -------------------------------------------------------
    @abstractmethod
    def conv_forward(self, x, weights, stride, padding, groups, train=False, dilation=1):
        """Darknet's convolution (cross-correlation, no flip): x (B, C, H, W), weights
        (F, C/groups, k, k) -> a new (B, F, out_h, out_w) with
        out = (n + 2*padding - dilation*(k-1) - 1) // stride + 1 per axis; `stride` is an int or
        (stride_y, stride_x); zero padding on every side; `groups` splits C and F alike.
        train=False allows inference-only algorithms (numpy: Winograd for 3x3 stride 1)."""

    def conv_bias_forward(self, x, weights, biases, activation, stride, padding, groups,
                          dilation=1):
        """Inference only: act(conv_forward(x, weights, ..., train=False) + biases[f]) as a new
        array, for an elementwise activation (not activations.CHANNEL_NAMES). One operation so
        that a backend may apply the bias and the activation to each block of the output while
        it is in cache (numpy); by default the two operations one after the other."""
        y = self.conv_forward(x, weights, stride, padding, groups, train=False, dilation=dilation)
        return self.add_bias_(y, biases, activation)

    def conv_bias_maxpool_forward(self, x, weights, biases, activation, stride, padding,
                                  groups, pool_size, pool_stride, pool_pad, pool_hw, out=None,
                                  start=0, keep=False, dilation=1):
        """Inference only: (pooled, y). pooled: the maxima maxpool_forward(conv_bias_forward(x,
        ...), pool_size, pool_stride, pool_pad, *pool_hw, train=False) of a [maxpool] that reads
        only this convolution (a new array), or only a [route] that concatenates it (stored in
        out's channels [start, start + F), out being the maxpool's output; out returned). y:
        the convolution's output where `keep` (other layers read it), else None. One operation
        so that a backend may pool each block of the convolution while it is in cache and store
        only what is read; by default the two operations (and one copy into out)."""
        y = self.conv_bias_forward(x, weights, biases, activation, stride, padding, groups,
                                   dilation=dilation)
        pooled, _ = self.maxpool_forward(y, pool_size, pool_stride, pool_pad, *pool_hw,
                                         train=False)
        if out is not None:
            b, f = int(pooled.shape[0]), int(pooled.shape[1])
            positions = int(pooled.size) // (b * f)
            self.strided_copy_(out, views.window((b, int(out.shape[1]), positions), None,
                                                 (start, f, 1)),
                               pooled, views.window((b, f, positions), None, (0, f, 1)))
            pooled = out
        return pooled, (y if keep else None)

    def conv_bias_maxpool_chain(self, x, stages):
        """Inference only: the output of a chain of convolutions, each followed by a [maxpool]
        that alone reads it and read by the next convolution alone (a new array: the last
        maxpool's output). stages: conv_bias_maxpool_forward's arguments for each
        convolution, (weights, biases, activation, stride, padding, groups, pool_size,
        pool_stride, pool_pad, pool_hw, dilation), in order. One operation so that a backend
        may run the whole chain band by band of rows on its threads, handing work over once
        (numpy); by default one conv_bias_maxpool_forward after the other."""
        for (weights, biases, activation, stride, padding, groups, pool_size, pool_stride,
             pool_pad, pool_hw, dilation) in stages:
            x, _ = self.conv_bias_maxpool_forward(x, weights, biases, activation, stride,
                                                  padding, groups, pool_size, pool_stride,
                                                  pool_pad, pool_hw, dilation=dilation)
        return x

    def conv_bias_forward_into_(self, out, start, x, weights, biases, activation, stride,
                                padding, groups, dilation=1):
        """Inference only: conv_bias_forward's values also stored in out's channels [start,
        start + F) (out (B, C, H, W), a [route]'s concatenation); returns an array of those
        values (a backend may compute them straight into out and return that channel slice).
        By default the convolution, then one copy into out: the operations the route's copy
        issued before."""
        y = self.conv_bias_forward(x, weights, biases, activation, stride, padding, groups,
                                   dilation=dilation)
        b, f = int(y.shape[0]), int(y.shape[1])
        positions = int(y.size) // (b * f)
        total = int(out.shape[1])
        # the views layers/channels.py's concat_channels gives: (batch, channels, positions)
        self.strided_copy_(out, views.window((b, total, positions), None, (start, f, 1)), y,
                           views.window((b, f, positions), None, (0, f, 1)))
        return y

    @abstractmethod
    def conv_backward(self, x, weights, delta, stride, padding, groups, weight_updates, need_dx,
                      dilation=1):
        """The adjoint of conv_forward for delta (B, F, out_h, out_w): weight_updates
        (F, C/groups, k, k) += the weights' negative gradient; returns a new delta for x
        (B, C, H, W), or None when need_dx is False."""

    @abstractmethod
    def connected_forward(self, x, weights):
        """x (B, ...) flattened to (B, inputs), weights (outputs, inputs) -> a new
        (B, outputs, 1, 1) = x @ weights.T."""

    @abstractmethod
    def connected_backward(self, x, weights, delta, weight_updates, need_dx):
        """delta (B, outputs, 1, 1): weight_updates (outputs, inputs) += delta^T @ x; returns a
        new delta for x (x's shape) = delta @ weights, or None when need_dx is False."""

    # ---- batch normalisation -------------------------------------------------------------------
    @abstractmethod
    def batchnorm_forward_train(self, x, scales, biases, rolling_mean, rolling_variance,
                                per_activation=False, activation="linear"):
        """Training batch norm (cuDNN's rule) of x (B, C, H, W) or (B, N, 1, 1): statistics per
        channel over batch and positions (SPATIAL), or per element over the batch
        (per_activation; parameters then of x.shape[1:]). y = act(scales * (x - mean) /
        sqrt(var + BN_TRAINING_EPSILON) + biases) with the biased batch variance, `activation`
        any elementwise one (not activations.CHANNEL_NAMES; layers.base.fusable), those whose
        gradient needs their input (activations.INPUT_GRADIENT) included: the cache then keeps
        what batchnorm_backward needs to recompute that input (x, the statistics, the
        parameters; `scales` and `biases` must stay unchanged until batchnorm_backward); in place:
        rolling_mean and rolling_variance move by BN_MOMENTUM toward the batch mean and the
        *unbiased* batch variance. Returns (new y, cache) where the cache is opaque and only for
        batchnorm_backward."""

    @abstractmethod
    def batchnorm_forward_inference(self, x, scales, biases, rolling_mean, rolling_variance,
                                    per_activation=False, activation="linear",
                                    epsilons=PJREDDIE_BN_EPSILONS):
        """Darknet's inference rule then the activation, a new array:
        act(scales * (x - rolling_mean) / (sqrt(rolling_variance + e0) + e1) + biases),
        (e0, e1) = epsilons: constants.PJREDDIE_BN_EPSILONS (the default) or
        ALEXEYAB_BN_EPSILONS. Layout as batchnorm_forward_train."""

    @abstractmethod
    def batchnorm_backward(self, delta, cache, scales, scale_updates, bias_updates):
        """The exact backward of batchnorm_forward_train (batch statistics, and its activation)
        for its cache: with d = delta * act'(z) (delta: of y = act(z), z = scales * x_norm +
        biases, act' from y or from z: activations.gradient or gradient_from_input, as an
        unfused activation pass would compute it), scale_updates += sum(d * x_norm),
        bias_updates += sum(d) per statistic; returns a new delta for x (delta itself may be
        changed)."""

    # ---- pooling, resampling, dropout ----------------------------------------------------------
    @abstractmethod
    def maxpool_forward(self, x, size, stride, pad, out_h, out_w, train=True):
        """Max pooling of x (B, C, H, W) -> (y (B, C, out_h, out_w), argmax): window (i, j)
        covers rows i*stride - pad + [0, size), columns likewise (the layer computes pad and the
        output size from its cfg: Darknet's rule lives in layers/maxpool.py); cells outside x
        never win and a window with none inside gives -FLT_MAX. argmax records the winners (the
        first on ties) in a backend-specific form, only for maxpool_backward; it may be None
        when train is False."""

    @abstractmethod
    def maxpool_backward(self, delta, argmax, in_shape, size, stride, pad):
        """Each window's delta (B, C, out_h, out_w) summed into the cell that won it: a new
        array of in_shape."""

    @abstractmethod
    def dropout_forward(self, x, probability):
        """Training dropout: each element zeroed with `probability`, survivors times 1/(1-p).
        Returns (new y, mask) where mask (x's shape) holds each element's factor (0 or 1/(1-p)),
        drawn from the backend's seeded random source."""

    @abstractmethod
    def dropout_backward(self, delta, mask):
        """delta * mask: a new array."""

    # ---- outputs and losses --------------------------------------------------------------------
    @abstractmethod
    def softmax(self, x, groups, temperature):
        """Softmax of x / temperature over each of `groups` equal contiguous blocks of every
        image's values (x (B, ...), flattened per image): a new array of x's shape."""

    @abstractmethod
    def softmax_cross_entropy(self, probabilities, truth):
        """(cost, delta) for softmax outputs: cost = -sum(truth * log(max(p,
        CROSS_ENTROPY_FLOOR))) over the batch as a Python float (0.0 while recording: read
        last_cost after the replay), delta = truth - p, a new array of probabilities' shape.
        truth: a host or backend array with as many values."""

    @abstractmethod
    def sse(self, output, truth):
        """Darknet's l2 cost: (sum of (truth - output)^2 as a float, new delta = truth - output),
        as softmax_cross_entropy."""

    # ---- the [yolo] losses (engine/layers/yolo.py): the dense part, and the cells the host reads --
    # Outputs are (B, A*E, H, W), E = 4 + 1 + classes entries per anchor: anchor a's are channels
    # a*E .. a*E+E-1, in the order x, y, w, h, objectness, classes.
    @abstractmethod
    def truth_overlap(self, output, truths, anchors, entries, net_w, net_h, new_coords, classes,
                      class_gate):
        """(best, index): two new arrays of shape (B, A, H, W), best float32 (the numpy backend,
        the reference, keeps float64), index int32. `truths`: an array (B, T*5) of Darknet rows
        (x, y, w, h, class) relative to the network input; an image's truths are its rows up to
        the first with x == 0; with `classes` not None (AlexeyAB's loss) a row whose int(class)
        lies outside [0, classes) is skipped (it does not end the list); with None, no class
        check. `anchors`: host (A, 2) sizes of the layer's mask anchors in input pixels.
        Prediction (b, a, j, i) decodes to px = (i + x)/W, py = (j + y)/H, pw = exp(w)*aw/net_w,
        ph = exp(h)*ah/net_h (new_coords: pw = w*w*4*aw/net_w, ph likewise). best = the largest
        Darknet box_iou (0 where the intersection or the union is 0) over the image's truths, 0
        if it has none; index = that truth's row (the first on ties), -1 if none. With
        `class_gate` not None, best is 0 (index unchanged) where no class score of the
        prediction is > class_gate (AlexeyAB's compare_yolo_class). float32 on a GPU, float64
        on the CPU: the two may disagree for a value exactly at a threshold."""

    @abstractmethod
    def objectness_delta_(self, delta, output, best, entries, normalizer, ignore_thresh, smooth):
        """In place on delta (output's shape), on the objectness entries only (channel a*E+4):
        d = normalizer * (0 - o); where best > ignore_thresh, d = max(d, normalizer * (best - o))
        if smooth, else 0. best as truth_overlap returns it. Returns delta."""

    @abstractmethod
    def gather_cells(self, x, cells, entries):
        """A host float32 array (U, entries): row u holds x[b, a*E:(a+1)*E, j, i] (E = entries)
        for row u = (b, a, j, i) of `cells`, a host int array (U, 4); U may be 0."""

    @abstractmethod
    def scatter_cells_(self, x, cells, values):
        """The inverse of gather_cells, in place: x[b, a*E:(a+1)*E, j, i] = values[u] for each
        row u = (b, a, j, i) of `cells` (rows unique), values host (U, E). Returns x."""

    @abstractmethod
    def sum_of_squares(self, x):
        """The sum of the squares of x's values (any shape) as a Python float, accumulated in
        float64 or in blocks."""

    @abstractmethod
    def apply_truth_events_(self, delta, output, truths, plan, loss):
        """The [yolo] losses' truth part, in place on delta (output's shape, after
        objectness_delta_), on the backend: for each cell a `plan` lists (an int32 array of the
        layout engine/backends/yolo_truths.py describes, made on the host by pack_plan), its
        events, one after the other in the plan's order, each the truth at its row of `truths`
        (an array (B, T*5) of rows (x, y, w, h, class), image b's for cell (b, a, j, i)) learnt
        by the cell's anchor a (size loss.anchors[a]); then, with AlexeyAB's loss and
        loss.iou_thresh < 1, averages_yolo_deltas on those cells. `loss` is a TruthLoss (the
        loss's numbers). The event and its delta are PjreddieTruthDeltas' or
        AlexeyabTruthDeltas' (yolo_truths.py: start / apply / class_delta / finish; every key
        TruthLoss holds): the cell's delta row computed in float32 values, with float64
        arithmetic where those compute in float64. Returns a new
        float64 array of the statistics yolo_truths.STATISTICS names (float64_values reads
        it), accumulated on the backend: a recording holds it, and each replay refreshes it."""

    @abstractmethod
    def int_array(self, host):
        """A new int32 array of host's integers (a table an operation reads, such as
        apply_truth_events_'s plan; set_ refreshes it in place)."""

    @abstractmethod
    def float64_values(self, array):
        """The values of a float64 array an operation made (apply_truth_events_'s statistics)
        as a host float64 numpy array, once the backend's work so far is finished."""

    @abstractmethod
    def host_reader(self, array):
        """A reader of a small array's values as they are at this point of the work issued (in
        a recording: at this point of each replay): its values() returns them as a host float64
        numpy array as soon as that point is passed, without waiting for the work issued after
        it (a recorded iteration's cost is read while its backward runs). Unlike to_host_async
        (eager work, float32, a read per call), one reader serves every replay of the recording
        it was made in."""

    @abstractmethod
    def output_reader(self, arrays):
        """A reader of a forward's outputs `arrays` as they are at this point of the work issued
        (in a recording: at this point of each replay): its values() returns (a float32 host
        numpy array of each, in order; whether every value is finite), waiting for that point
        only. Where the backend records, the conversion, the finiteness check and the copies to
        the host are part of the recording, so a replay's outputs reach the host with no
        further call: what predict reads."""

    # ---- optimisation --------------------------------------------------------------------------
    @abstractmethod
    def sgd_update(self, param, gradient, velocity, learning_rate, momentum, decay, batch,
                   loss_scale=None):
        """Darknet's SGD step for one tensor, in place. `gradient` holds the batch's summed
        negative gradients and is zeroed; `velocity` is the optimiser's state:
        velocity = momentum*velocity + gradient - decay*batch*param; param += learning_rate/batch
        * velocity; gradient = 0 (Darknet's one buffer holds the same values). While recording,
        the learning rate is the replay's. With `loss_scale`, a loss-scale state (below: (S,
        overflow)): `gradient` holds S times the gradients and the step uses gradient / S
        (rounded once, in float32); where overflow is not 0, param and velocity stay unchanged
        and only gradient = 0 (the step is skipped). Returns nothing."""

    # ---- loss scaling (engine/loss_scaling.py) -------------------------------------------------
    # A *loss-scale state* is a float32 array of this backend holding (S, overflow) and, where
    # update_loss_scale_ keeps them, (good steps, skipped steps): four values. The host writes it
    # once, before training, and reads it with to_host_async; only these operations (and
    # sgd_update) read or write it, on the backend, so a recorded iteration replays them with
    # each iteration's S and nothing inside an iteration waits for the host.
    @abstractmethod
    def apply_loss_scale_(self, delta, loss_scale):
        """delta *= S (state[0], read where the state lives), in place, rounded once to delta's
        type; returns delta. The loss layers' deltas before the backward pass."""

    @abstractmethod
    def flag_non_finite_(self, loss_scale, array):
        """state[1] = 1 if any value of `array` is NaN or infinite; otherwise state unchanged
        (the check of every gradient of an iteration ORs into one flag, on the device, with no
        host synchronisation). Returns loss_scale."""

    @abstractmethod
    def update_loss_scale_(self, loss_scale, dynamic, growth_interval):
        """The end of an iteration's update, on a four-value state (S, overflow, good, skipped):
        where overflow is not 0, good = 0 and skipped += 1, and S halves when `dynamic`;
        otherwise good += 1, and when it reaches `growth_interval` (an int) good = 0 and S
        doubles when `dynamic`. Then overflow = 0. In float32, read and written where the state
        lives (one thread on a GPU). Returns loss_scale."""

    # ---- broadcasting arithmetic ---------------------------------------------------------------
    @abstractmethod
    def multiply(self, a, b):
        """a * b for 4-D arrays of which one broadcasts over any of its axes of size 1 (batch,
        channel, or all positions): a new array of the larger shape."""

    @abstractmethod
    def add(self, a, b, alpha=1.0, beta=1.0):
        """alpha*a + beta*b for 4-D arrays, b broadcast over any of its axes of size 1 (as in
        multiply): a new array shaped like a."""

    @abstractmethod
    def sum_to(self, x, shape, scale=1.0):
        """scale times x summed over the axes where `shape` (as many axes as x, at most six) has
        1 and x does not (the adjoint of broadcasting): a new array of `shape`."""

    # ---- strided views (views.py: a shape, an optional permutation, a window per axis) ---------
    @abstractmethod
    def strided_copy_(self, dst, dst_view, src, src_view, scale=1.0, shift=0.0,
                      accumulate=False):
        """dst[dst_view] = scale * src[src_view] + shift, or += that when `accumulate`, in place;
        the two windows hold the same counts (a step of 0 in src's window repeats a cell); src
        may be dst itself with the same view. Returns dst. Route, shortcut, reorg, crop,
        upsample and the YOLO activation are composed of it in their layers."""

    def channels_to_read(self, x, start, stop):
        """Inference only: channels [start, stop) of x (B, C, ...) for later operations to read
        and never write: a view where the backend can (numpy), else a new array; by default
        the new array and the one copy a [route] of one input's channel group made before."""
        b, c = int(x.shape[0]), int(x.shape[1])
        positions = int(x.size) // (b * c)
        y = self.empty((b, stop - start) + tuple(x.shape[2:]), like=x)
        return self.strided_copy_(y, views.window((b, stop - start, positions), None,
                                                  (0, stop - start, 1)),
                                  x, views.window((b, c, positions), None,
                                                  (start, stop - start, 1)))

    @abstractmethod
    def softmax_(self, x, view, axis):
        """Softmax along `axis` of the window of `view` in x, in place (the largest value
        subtracted before exp); the rest of x unchanged. Returns x."""

    # ---- channels ------------------------------------------------------------------------------
    @abstractmethod
    def channel_max(self, x, groups):
        """AlexeyAB's maxpool_depth: output channel g (of `groups`) is the maximum over input
        channels g, g+groups, g+2*groups... at each position (the first on ties). Returns (new y
        (B, groups, H, W), winner) where winner (int32, y's shape) is the winning input channel."""

    @abstractmethod
    def channel_max_backward(self, delta, winner, in_shape):
        """Each output's delta to the input channel that won it: a new array of in_shape."""

    @abstractmethod
    def local_avgpool(self, x, size, stride, pad, out_h, out_w):
        """AlexeyAB's [local_avgpool]: the mean of the input cells inside each window (windows
        as maxpool_forward's; cells outside the input not counted): a new (B, C, out_h, out_w)."""

    @abstractmethod
    def local_avgpool_backward(self, delta, in_shape, size, stride, pad):
        """The adjoint of local_avgpool: each window's delta / its cell count, summed back: a new
        array of in_shape."""

    # ---- data-parallel training ----------------------------------------------------------------
    @abstractmethod
    def collectives(self, comm):
        """How this backend's arrays are summed over the ranks of the MPI communicator `comm`:
        an object whose allreduce_sum_(array) sums a contiguous float32 array over the ranks,
        in place, and returns it (host arrays: MPI's Allreduce; GPU arrays: NCCL)."""

    # ---- recording (only where can_record) -----------------------------------------------------
    def recording(self):
        """A context manager for the duration of a recording (`with ops.recording() as kept:`):
        sgd_update's learning rate and the dropout seed are read from values set_step refreshes
        before each replay, loss operations return 0.0, and every array allocated is appended to
        `kept` to live as long as the recording. Only where can_record."""
        raise BackendError(f"the {self.name} backend cannot record steps")

    def set_step(self, learning_rate, step):
        """The values the next replay of a recording reads: its learning rate, and its dropout
        seed drawn from the backend's seed and `step`. Only where can_record."""
        raise BackendError(f"the {self.name} backend cannot record steps")

    def capture(self, step):
        """Record step() (a function issuing this backend's operations) once, returning an object
        whose replay(learning_rate=0.0) reruns it on the same buffers, whose `result` is step()'s
        return value and whose last_cost() reads the cost of the latest replay. Run step() once
        eagerly first. Only where can_record; elsewhere a BackendError."""
        raise BackendError(f"the {self.name} backend cannot record steps")

    def last_cost(self):
        """The cost of the latest loss operation (softmax_cross_entropy, sse) as a float, for
        recorded steps, whose loss operations return 0.0 (only where can_record)."""
        raise BackendError(f"the {self.name} backend cannot record steps")


class HostRead(ABC):
    """What to_host_async returns: a read of a backend array on its way to the host."""

    @abstractmethod
    def ready(self):
        """True once value() would not wait (never waits itself)."""

    @abstractmethod
    def value(self):
        """The values (a float32 numpy array, to_host's), waiting for the copy if needed."""


class ReadyRead(HostRead):
    """A read whose values are already on the host (numpy; host arrays on a GPU backend)."""

    def __init__(self, values):
        self.values = values

    def ready(self):
        return True

    def value(self):
        return self.values


class OutputsNow:
    """An output_reader whose values are on the host already (numpy; eager work on a GPU)."""

    def __init__(self, outputs, finite):
        self.outputs, self.finite = outputs, finite

    def values(self):
        return self.outputs, self.finite
