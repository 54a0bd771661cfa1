"""Networks shared by objectives: plain ``nn.Module``s that know nothing of losses."""

from pipeline.models.mlp import MLP
from pipeline.models.unet import UNet

__all__ = ["MLP", "UNet"]
