"""lycoft: orthogonal finetuning (OFT and butterfly OFT) for Stable Diffusion.

    import lycoft
    net = lycoft.inject(unet=unet, text_encoders=[te], config=lycoft.AdapterConfig(algo="boft", block_size=8))
    net.save("a.safetensors"); net.merge(); net.remove()
    net = lycoft.load("a.safetensors", unet=unet, text_encoders=[te], multiplier=1.0)
"""

from ._version import __version__
from .config import AdapterConfig
from .layers import OFTLayer, wrap
from .network import Network, inject, load

__all__ = ["AdapterConfig", "Network", "OFTLayer", "inject", "load", "wrap", "__version__"]
