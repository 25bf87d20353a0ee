"""Finding the lycoft package from inside ComfyUI's Python environment.

lycoft is normally installed into ComfyUI's environment (``pip install --no-deps lycoft`` or
``pip install --no-deps -e <checkout>``: the parts used here need only torch and safetensors, which ComfyUI
has). When this folder is a symlink into a lycoft checkout, the checkout itself is used.
"""

from __future__ import annotations

import importlib.util
import os
import sys


def lycoft_available() -> None:
    """Make ``import lycoft`` work, or raise one line saying how to install it."""
    if importlib.util.find_spec("lycoft") is not None:
        return
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
    if os.path.isfile(os.path.join(checkout, "lycoft", "__init__.py")):
        sys.path.append(checkout)
        return
    raise ImportError(
        "lycoft_comfy needs the lycoft package in ComfyUI's Python environment; run "
        "`<ComfyUI python> -m pip install --no-deps -e <lycoft checkout>` (or symlink "
        "<lycoft checkout>/extensions/comfyui/lycoft_comfy into ComfyUI/custom_nodes)"
    )
