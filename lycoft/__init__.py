"""lycoft: orthogonal finetuning (OFT and butterfly OFT) for Stable Diffusion."""

from .config import AdapterConfig
from .layers import OFTLayer, wrap

__version__ = "0.1.0"

__all__ = ["AdapterConfig", "OFTLayer", "wrap", "__version__"]
