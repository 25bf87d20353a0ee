"""What the UI extensions share: reading OFT layers out of the UIs' own LoRA loading paths.

`extensions/comfyui/lycoft_comfy` (ComfyUI) and `extensions/sd-webui-lycoft` (Forge, Forge Classic,
reForge, A1111) are thin: they hook the UI and call these modules, which import only torch, safetensors
and the lycoft rooms below them (`lycoft.formats.patches`, `lycoft.ops`, `lycoft.io`), never the UIs.
- `keys`: the layer names the ComfyUI-family key maps (ComfyUI, Forge, reForge) lack, for OFT files;
- `state`: a file's metadata carried with its tensors, and the formula a load asks for;
- `comfy_adapter`: the weight adapter class for UIs with ComfyUI's adapter interface (ComfyUI, reForge),
  built on the UI's own base class.
"""
