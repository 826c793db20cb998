"""The registry from cfg section name to layer class: the one place a new layer type is added."""

from .activation import ActivationLayer
from .avgpool import AvgpoolLayer
from .batchnorm import BatchnormLayer
from .connected import ConnectedLayer
from .convolutional import ConvolutionalLayer
from .cost import CostLayer
from .crop import CropLayer
from .detection_v1 import ContrastiveLayer, DetectionLayer
from .dropout import DropoutLayer
from .empty import EmptyLayer
from .gaussian_yolo import GaussianYoloLayer
from .implicit import ImplicitLayer
from .maxpool import LocalAvgpoolLayer, MaxpoolLayer
from .region import RegionLayer
from .reorg import Reorg3dLayer, ReorgLayer
from .route import RouteLayer
from .sam import SamLayer, ScaleChannelsLayer
from .shortcut import ShortcutLayer
from .softmax import SoftmaxLayer
from .upsample import UpsampleLayer
from .yolo import YoloLayer

LAYER_TYPES = {}


def register(cls, *aliases):
    for name in (cls.type_name,) + aliases:
        LAYER_TYPES[name] = cls


register(ConvolutionalLayer, "conv")
register(ConnectedLayer, "conn")
register(MaxpoolLayer, "max")
register(AvgpoolLayer, "avg")
register(DropoutLayer)
register(SoftmaxLayer, "soft")
register(CostLayer)
register(BatchnormLayer)
register(ActivationLayer)
register(RouteLayer)
register(UpsampleLayer)
register(ShortcutLayer)
register(YoloLayer)
register(RegionLayer)
register(ReorgLayer)
register(CropLayer)
register(Reorg3dLayer)
register(SamLayer)
register(ScaleChannelsLayer)
register(LocalAvgpoolLayer, "local_avg")
register(EmptyLayer, "silence")
register(ImplicitLayer)
register(GaussianYoloLayer)
register(DetectionLayer)
register(ContrastiveLayer)
