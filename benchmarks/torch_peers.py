"""The benchmark networks written in PyTorch, the peer the benchmarks measure the engine against.
PyTorch is imported by the caller (and only by benchmarks): it is never an engine dependency."""

import numpy as np


def torch_model(name, nn):
    """cfg/mnist.cfg or cfg/cifar.cfg as an nn.Sequential: BN layers without a bias before them,
    BN momentum 0.01 (Darknet's rolling factor), leaky 0.1."""
    def conv(c_in, c_out, size=3, pad=1, bn=True):
        layers = [nn.Conv2d(c_in, c_out, size, padding=pad, bias=not bn)]
        if bn:
            layers.append(nn.BatchNorm2d(c_out, momentum=0.01, eps=1e-5))
        return layers + [nn.LeakyReLU(0.1)]

    if name == "mnist":
        return nn.Sequential(*conv(1, 32), nn.MaxPool2d(2, 2), *conv(32, 64), nn.MaxPool2d(2, 2),
                             nn.Flatten(), nn.Linear(3136, 256, bias=False),
                             nn.BatchNorm1d(256, momentum=0.01), nn.LeakyReLU(0.1),
                             nn.Dropout(0.5), nn.Linear(256, 10))
    return nn.Sequential(*conv(3, 128), *conv(128, 128), *conv(128, 128), nn.MaxPool2d(2, 2),
                         nn.Dropout(0.5), *conv(128, 256), *conv(256, 256), *conv(256, 256),
                         nn.MaxPool2d(2, 2), nn.Dropout(0.5), *conv(256, 512), *conv(512, 512),
                         *conv(512, 512), nn.Dropout(0.5), *conv(512, 10, 1, 0, bn=False),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


def darknet_init(model, torch, nn, rng):
    """Darknet's initial values: convolution weights sqrt(2/fan_in) * normal, connected weights
    sqrt(2/inputs) * uniform(-1, 1), biases 0, BN scales 1."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                values = np.sqrt(2.0 / fan_in) * rng.standard_normal(module.weight.shape)
            elif isinstance(module, nn.Linear):
                values = np.sqrt(2.0 / module.in_features) * rng.uniform(-1, 1, module.weight.shape)
            else:
                continue
            module.weight.copy_(torch.as_tensor(values, dtype=torch.float32))
            if module.bias is not None:
                module.bias.zero_()
    return model


def darknet_sgd(model, torch, learning_rate, momentum=0.9, decay=0.0005):
    """Darknet's update as torch.optim.SGD: with the loss averaged over the batch, Darknet's
    `u = momentum*u - decay*batch*w + summed gradient; w += lr/batch * u` is SGD with momentum
    and weight decay, the decay applied to weights only (not to biases and BN scales)."""
    weights = [p for p in model.parameters() if p.dim() > 1]
    others = [p for p in model.parameters() if p.dim() == 1]
    return torch.optim.SGD([{"params": weights, "weight_decay": decay},
                            {"params": others, "weight_decay": 0.0}],
                           lr=learning_rate, momentum=momentum)


def torch_from_network(net, torch):
    """An nn.Module computing what the engine's (BN-folded) detection network computes, layer by
    layer from the cfg the engine parsed: [convolutional] (with bias), [maxpool] (Darknet's
    padding rule: windows start at -padding//2, cells outside are -inf), [route] (with
    groups/group_id), [upsample], [shortcut] (equal shapes), [yolo] (the logistic on x, y,
    objectness and classes, scale_x_y). Parameters are copied from the engine's layers.
    `model.outputs` holds every layer's output after a call."""
    nn, functional = torch.nn, torch.nn.functional
    acts = {"leaky": lambda v: functional.leaky_relu(v, 0.1), "linear": lambda v: v,
            "logistic": torch.sigmoid, "relu": functional.relu, "mish": functional.mish,
            "swish": functional.silu}

    class Peer(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleDict()
            for layer in net.layers:
                kind = layer.type_name
                if kind == "convolutional":
                    if layer.batch_normalize or layer.blur is not None or layer.dilation != 1:
                        raise ValueError(f"layer {layer.index}: fold BN first; no antialiasing")
                    c = layer.in_shape[0]
                    conv = nn.Conv2d(c, layer.filters, layer.size, layer.stride, layer.padding,
                                     groups=layer.groups, bias=True)
                    with torch.no_grad():
                        conv.weight.copy_(torch.from_numpy(np.array(layer.params["weights"])))
                        conv.bias.copy_(torch.from_numpy(np.array(layer.params["biases"])))
                    self.convs[str(layer.index)] = conv
                elif kind not in ("maxpool", "route", "upsample", "shortcut", "yolo"):
                    raise ValueError(f"layer {layer.index}: [{kind}] has no PyTorch peer here")

        def forward(self, x):
            outputs = []
            for layer in net.layers:
                kind = layer.type_name
                inputs = [x if j < 0 else outputs[j] for j in layer.input_indices]
                v = inputs[0]
                if kind == "convolutional":
                    y = acts[layer.activation](self.convs[str(layer.index)](v))
                elif kind == "maxpool":
                    top = layer.padding // 2
                    if layer.padding:
                        v = functional.pad(v, (top, layer.padding - top, top,
                                               layer.padding - top), value=float("-inf"))
                    y = functional.max_pool2d(v, layer.size, layer.stride)
                elif kind == "route":
                    parts = [t.chunk(layer.groups, 1)[layer.group_id] for t in inputs]
                    y = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
                elif kind == "upsample":
                    y = functional.interpolate(v, scale_factor=layer.stride, mode="nearest")
                    if layer.scale != 1:
                        y = y * layer.scale
                elif kind == "shortcut":
                    y = acts[layer.activation](inputs[0] + inputs[1])
                else:  # yolo
                    b, _, h, w = v.shape
                    g = v.reshape(b, len(layer.mask), -1, h, w)
                    xy = torch.sigmoid(g[:, :, 0:2])
                    if layer.scale_x_y != 1:
                        xy = xy * layer.scale_x_y - 0.5 * (layer.scale_x_y - 1)
                    y = torch.cat([xy, g[:, :, 2:4], torch.sigmoid(g[:, :, 4:])], 2)
                    y = y.reshape(v.shape)
                outputs.append(y)
            self.outputs = outputs
            return [outputs[layer.index] for layer in net.layers if layer.type_name == "yolo"]

    return Peer()
