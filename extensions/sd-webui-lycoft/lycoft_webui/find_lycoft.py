"""Finding the lycoft package from inside the webui's Python environment.

lycoft is normally installed into the webui's venv (``pip install --no-deps -e <lycoft checkout>``: the parts
used here need only torch and safetensors, which the webui has). When this extension folder is a symlink
into a lycoft checkout, the checkout itself is used.
"""

from __future__ import annotations

import importlib.util
import os
import sys


def lycoft_available() -> None:
    """Make ``import lycoft`` work, or raise one line saying how to install it."""
    if importlib.util.find_spec("lycoft") is not None:
        return
    here = os.path.realpath(__file__)
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(here))))
    if os.path.isfile(os.path.join(checkout, "lycoft", "__init__.py")):
        sys.path.append(checkout)
        return
    raise ImportError(
        "sd-webui-lycoft needs the lycoft package in the webui's Python environment; run "
        "`<webui venv>/bin/python -m pip install --no-deps -e <lycoft checkout>` (or symlink "
        "<lycoft checkout>/extensions/sd-webui-lycoft into the webui's extensions folder)"
    )
