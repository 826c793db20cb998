"""[batchnorm]: a standalone batch normalisation layer, so BN can also follow an activation.

y = scales * normalize(x) + biases, statistics per channel (SPATIAL, Darknet's choice) or, with
our extension key `per_activation=1`, per element over the batch (cuDNN's PER_ACTIVATION).
The .weights file holds scales, rolling_mean and rolling_variance (Darknet stores no biases for
this layer, so they load as zero).
"""

import numpy as np

from .base import Layer


class BatchnormLayer(Layer):
    type_name = "batchnorm"

    def __init__(self, section, index, in_shapes, net):
        super().__init__(section, index, in_shapes, net)
        self.per_activation = section.bool("per_activation", False)
        n = self.outputs if self.per_activation else self.in_shape[0]
        self.add_param("biases", np.zeros(n))
        self.add_param("scales", np.ones(n))
        self.add_param("rolling_mean", np.zeros(n))
        self.add_param("rolling_variance", np.ones(n))
        self.weight_order = ("scales", "rolling_mean", "rolling_variance")

    def describe(self):
        c, h, w = self.in_shape
        return "Batch Normalization Layer: %d x %d x %d image" % (w, h, c)


    def forward(self, ops, x, train):
        p = self.params
        args = (p["scales"], p["biases"], p["rolling_mean"], p["rolling_variance"],
                self.per_activation)
        if train:
            y, self.bn_cache = ops.batchnorm_forward_train(x, *args)
            return y
        return ops.batchnorm_forward_inference(x, *args, epsilons=self.bn_epsilons)

    def backward(self, ops, delta, need_dx):
        dx = ops.batchnorm_backward(delta, self.bn_cache, self.params["scales"],
                                    self.updates["scales"], self.updates["biases"])
        return dx if need_dx else None
