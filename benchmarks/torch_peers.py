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


def torch_from_network(net, torch, keep_outputs=True):
    """An nn.Module computing what the engine's detection network computes, layer by layer from
    the cfg the engine parsed: [convolutional] (with bias, or batch_normalize as nn.BatchNorm2d
    holding the rolling statistics: train() makes it learn as Darknet's does), [maxpool]
    (Darknet's padding rule: windows start at -padding//2, cells outside are -inf), [route]
    (with groups/group_id), [upsample], [shortcut] (equal shapes, no weights), [yolo] (the
    logistic on x, y, objectness and classes, scale_x_y). Parameters are copied from the
    engine's layers. With keep_outputs, `model.outputs` holds every layer's output after a call;
    without, each output is dropped after its last use (as a hand-written module would)."""
    nn, functional = torch.nn, torch.nn.functional
    acts = {"leaky": lambda v: functional.leaky_relu(v, 0.1), "linear": lambda v: v,
            "logistic": torch.sigmoid, "relu": functional.relu, "mish": functional.mish,
            "swish": functional.silu}

    def convolution(layer):
        if layer.blur is not None or layer.dilation != 1:
            raise ValueError(f"layer {layer.index}: antialiasing and dilation have no peer here")
        p = {name: torch.from_numpy(np.array(value)) for name, value in layer.params.items()}
        conv = nn.Conv2d(layer.in_shape[0], layer.filters, layer.size, layer.stride,
                         layer.padding, groups=layer.groups, bias=not layer.batch_normalize)
        with torch.no_grad():
            conv.weight.copy_(p["weights"].reshape(conv.weight.shape))
            if not layer.batch_normalize:
                conv.bias.copy_(p["biases"])
                return conv
            # Darknet's BN: eps 1e-5 in training, rolling statistics updated by 1%
            norm = nn.BatchNorm2d(layer.filters, eps=1e-5, momentum=0.01)
            norm.weight.copy_(p["scales"])
            norm.bias.copy_(p["biases"])
            norm.running_mean.copy_(p["rolling_mean"])
            norm.running_var.copy_(p["rolling_variance"])
        return nn.Sequential(conv, norm)

    def refuse_unsupported(layer):
        kind = layer.type_name
        if kind == "maxpool" and (getattr(layer, "antialiasing", 0)
                                  or getattr(layer, "depth", False)):
            raise ValueError(f"layer {layer.index}: this [maxpool] variant has no peer here")
        if kind == "shortcut" and (layer.multilayer or layer.from_shape != layer.in_shape):
            raise ValueError(f"layer {layer.index}: weighted, multi-input or unequal-shape "
                             "[shortcut] has no peer here")
        if kind == "yolo" and layer.new_coords:
            raise ValueError(f"layer {layer.index}: [yolo] new_coords=1 has no peer here")

    class Peer(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleDict()
            for layer in net.layers:
                kind = layer.type_name
                if kind == "convolutional":
                    self.convs[str(layer.index)] = convolution(layer)
                elif kind not in ("maxpool", "route", "upsample", "shortcut", "yolo"):
                    raise ValueError(f"layer {layer.index}: [{kind}] has no PyTorch peer here")
                refuse_unsupported(layer)
            # the last layer reading each output (the [yolo] outputs are returned: kept)
            self.last_use = {}
            for layer in net.layers:
                for j in layer.input_indices:
                    self.last_use[j] = layer.index
            for layer in net.layers:
                if layer.type_name == "yolo":
                    self.last_use[layer.index] = len(net.layers)

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
                if not keep_outputs:
                    for j in set(layer.input_indices) | {layer.index}:
                        if j >= 0 and self.last_use.get(j, -1) <= layer.index:
                            outputs[j] = None
            self.outputs = outputs
            return [outputs[layer.index] for layer in net.layers if layer.type_name == "yolo"]

    return Peer()
