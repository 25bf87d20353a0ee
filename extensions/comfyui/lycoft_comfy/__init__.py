"""lycoft for ComfyUI: every OFT/BOFT file loads with lycoft's semantics through ComfyUI's own LoRA loaders.

Installed into ``ComfyUI/custom_nodes/``, this package registers one weight adapter with ComfyUI's adapter
list (it takes the place of ComfyUI's OFT and BOFT adapters) and extends the key maps for the spellings
ComfyUI does not know, so that the stock "Load LoRA" nodes, the bypass loaders, LoRA hooks and "Save
Checkpoint" read every OFT layout (LyCORIS, kohya legacy, LyCORIS 2.0, PEFT, kohya oft_v2/boft, OneTrainer)
at every strength, in every patch dtype. Files that hold no OFT layer load exactly as before.

It adds one node, "Load OFT (lycoft)", which can also reproduce ComfyUI's own OFT formula for old workflows.
"""

from .lycoft_import import lycoft_available

lycoft_available()

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402
from .registration import install  # noqa: E402

install()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "install"]
