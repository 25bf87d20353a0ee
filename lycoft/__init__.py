"""lycoft: orthogonal finetuning (OFT and butterfly OFT) for Stable Diffusion.

    import lycoft
    net = lycoft.inject(unet=unet, text_encoders=[te], config=lycoft.AdapterConfig(algo="boft", block_size=8))
    net.save("a.safetensors"); net.merge(); net.remove()
    net = lycoft.load("a.safetensors", unet=unet, text_encoders=[te], multiplier=1.0)
"""

from .config import AdapterConfig
from .formats.lycoris import load_adapter as load
from .layers import OFTLayer, wrap
from .network import Network, inject

__version__ = "0.1.0"

__all__ = ["AdapterConfig", "Network", "OFTLayer", "inject", "load", "wrap", "__version__"]
