"""The "Load OFT (lycoft)" node: an OFT/BOFT file onto a model and CLIP, with the formula and mode chosen.

The stock "Load LoRA" nodes already apply OFT files with lycoft's semantics once this extension is
installed. This node adds the choices a workflow may need:
- formula ``lycoft``: lycoft's strength (every rotation block `s R + (1 - s) I`, rescale after it): the
  weights `tools/merge.py --adapter file:s` writes; ``comfyui stock``: ComfyUI's own OFT/BOFT adapters, as
  ComfyUI computes them without this extension (strength applied twice at s != 1, OFT rescale ignored,
  only the LyCORIS layout read), to reproduce images made before;
- mode ``patch`` (weights patched, as "Load LoRA") or ``bypass`` (activations, as "Load LoRA (Bypass)").
"""

from __future__ import annotations

import logging

import comfy.sd
import comfy.utils
import folder_paths

from lycoft.ui.state import formula as use_formula

log = logging.getLogger("lycoft")

FORMULAS = ["lycoft", "comfyui stock"]
MODES = ["patch", "bypass"]


class LoadOFTLycoft:
    """Load an OFT/BOFT adapter (any layout) with lycoft's strength semantics or ComfyUI's own."""

    DESCRIPTION = ("Applies an OFT/BOFT adapter (LyCORIS, kohya, PEFT, OneTrainer, lycoft files) to the diffusion "
                   "model and CLIP. 'lycoft' gives the same weights as lycoft's merge at every strength; "
                   "'comfyui stock' reproduces ComfyUI's own OFT formula for old workflows.")
    CATEGORY = "loaders"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "CLIP")
    OUTPUT_TOOLTIPS = ("The diffusion model with the adapter.", "The CLIP model with the adapter.")

    def __init__(self) -> None:
        self.loaded: tuple[str, dict, dict | None] | None = None  # (path, tensors, metadata) of the last file

    @classmethod
    def INPUT_TYPES(cls) -> dict:  # noqa: N802 (ComfyUI's name)
        strength = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}
        return {
            "required": {
                "model": ("MODEL",),
                "clip": ("CLIP",),
                "lora_name": (folder_paths.get_filename_list("loras"), {"tooltip": "The OFT/BOFT file."}),
                "strength_model": ("FLOAT", {**strength, "tooltip": "Strength on the diffusion model; 0 = off."}),
                "strength_clip": ("FLOAT", {**strength, "tooltip": "Strength on CLIP; 0 = off."}),
                "formula": (FORMULAS, {"default": "lycoft", "tooltip": "lycoft: exact at every strength; "
                                       "comfyui stock: ComfyUI's own OFT formula, for old workflows."}),
                "mode": (MODES, {"default": "patch", "tooltip": "patch: weights patched once; bypass: "
                                 "applied on the activations (weights untouched, e.g. for offloaded models)."}),
            }
        }

    def load(self, model, clip, lora_name: str, strength_model: float, strength_clip: float,
             formula: str = "lycoft", mode: str = "patch"):
        if formula not in FORMULAS:
            raise ValueError(f"formula {formula!r} is not known; use one of {FORMULAS}")
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not known; use one of {MODES}")
        if strength_model == 0 and strength_clip == 0:
            return (model, clip)
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        if self.loaded is None or self.loaded[0] != path:
            tensors, metadata = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
            self.loaded = (path, tensors, metadata)
        _, tensors, metadata = self.loaded
        with use_formula(stock=formula == "comfyui stock"):
            if mode == "bypass":
                return comfy.sd.load_bypass_lora_for_models(model, clip, tensors, strength_model, strength_clip)
            return comfy.sd.load_lora_for_models(model, clip, tensors, strength_model, strength_clip,
                                                 lora_metadata=metadata)


class LoadOFTLycoftModelOnly(LoadOFTLycoft):
    """The same, for the diffusion model only."""

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The diffusion model with the adapter.",)
    FUNCTION = "load_model_only"

    @classmethod
    def INPUT_TYPES(cls) -> dict:  # noqa: N802
        required = dict(super().INPUT_TYPES()["required"])
        del required["clip"], required["strength_clip"]
        return {"required": required}

    def load_model_only(self, model, lora_name: str, strength_model: float, formula: str = "lycoft",
                        mode: str = "patch"):
        return (self.load(model, None, lora_name, strength_model, 0.0, formula, mode)[0],)


NODE_CLASS_MAPPINGS = {
    "LoadOFTLycoft": LoadOFTLycoft,
    "LoadOFTLycoftModelOnly": LoadOFTLycoftModelOnly,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LoadOFTLycoft": "Load OFT (lycoft)",
    "LoadOFTLycoftModelOnly": "Load OFT (lycoft, model only)",
}
