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
