"""lycoft for the AUTOMATIC1111 family: A1111, Forge, Forge Classic and reForge apply every OFT/BOFT file exactly,
at every multiplier, through their own LoRA loading path (the `<lora:name:multiplier>` prompt syntax, the
Lora network list, hires fix and the API keep working).

Each UI is recognised by the module its LoRA loader uses, and hooked there:
- reForge (`ldm_patched.modules.weight_adapter`) and Forge Classic (`modules_forge.packages.comfy
  .weight_adapter`) have ComfyUI's weight-adapter interface: their OFT and BOFT adapters are replaced by
  lycoft's (`lycoft.ui.comfy_adapter`), and their `load_lora` learns the OFT spellings it lacks;
- Forge (`backend.patcher.lora` with `extra_weight_calculators`) has no OFT code: lycoft's layers are read
  first (a LoRA "collection" ahead of Forge's own) and merged by a weight calculator of their own;
- Forge before its 2024 backend and the Forge Classic releases that keep it (`ldm_patched` without the
  adapter list, `model_patcher.extra_weight_calculators`): the same, around `ldm_patched.modules.lora
  .load_lora`; tried only when none of the above is there (reForge's `ldm_patched` has both);
- A1111 (its Lora extension's `networks.module_types`) gets a network module type ahead of its own OFT type
  (`a1111`), tried only when none of the above is there.
The file's metadata travels with its tensors (`networks.load_lora_state_dict`), so PEFT-style layers are
read with the parametrisation they were trained with.
"""

from __future__ import annotations

from .find_lycoft import lycoft_available

lycoft_available()

from . import a1111, comfy_interface, forge, state_dict  # noqa: E402


def install() -> list[str]:
    """Hook every LoRA path this UI has; returns the names of those hooked (empty: nothing recognised)."""
    hooked = [name for name, hook in (("reForge", comfy_interface.install_reforge),
                                      ("Forge Classic", comfy_interface.install_forge_classic),
                                      ("Forge", forge.install)) if hook()]
    if not hooked and forge.install_ldm_patched():
        hooked = ["Forge Classic"]
    if hooked:
        state_dict.install()
    elif a1111.install():
        hooked = ["A1111"]
    return hooked
