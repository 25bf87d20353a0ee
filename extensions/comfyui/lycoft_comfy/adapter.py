"""The weight adapter ComfyUI uses for every OFT/BOFT layer once this extension is installed: lycoft's
(`lycoft.ui.comfy_adapter`) on ComfyUI's own `WeightAdapterBase`, with ComfyUI's OFT/BOFT adapters as the
stock formula."""

from __future__ import annotations

import comfy.weight_adapter as weight_adapter
from comfy.weight_adapter.base import WeightAdapterBase

from lycoft.ui.comfy_adapter import adapter_class

STOCK = (weight_adapter.OFTAdapter, weight_adapter.BOFTAdapter)
LycoftOFTAdapter = adapter_class(WeightAdapterBase, lambda: STOCK)
