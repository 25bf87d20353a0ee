"""Entry points for kohya-ss/sd-scripts: ``--network_module lycoft.kohya``.

    accelerate launch train_network.py ... --network_module lycoft.kohya --network_dim 32 \\
        --network_args "algo=boft" "block_size=8" "butterfly_factors=2" "preset=attn-mlp"

``network_dim`` is the block size (the LyCORIS meaning; kohya's legacy ``networks.oft`` counted blocks:
pass ``block_num=`` for that). ``network_alpha`` has no meaning for OFT and is ignored; the COFT bound is
``constraint=``. ``--network_args`` are the keys of `lycoft.config.OPTIONS`, parsed by the same
`lycoft.config.parse_network_args` as ``train_network.py``'s, so every key means the same in both.

The import path needs only torch, safetensors and lycoft's own modules (no diffusers/transformers), so it
works in the environment sd-scripts pins.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .config import AdapterConfig, NetworkOptions, parse_network_args
from .formats.lycoris import parse_adapter_tensors
from .io.safe_io import read_safetensors
from .network import Network, attach_specs, detect_family, inject
from .network_files import load_into_network, save_network

log = logging.getLogger("lycoft")


def network_options(network_dim: int | None, kwargs: dict[str, Any],
                    neuron_dropout: float | None = None) -> NetworkOptions:
    """kohya's ``network_dim``, ``--network_args`` (string values) and ``--network_dropout`` -> the options;
    the keys that do not apply to rotations are reported here, once."""
    options = parse_network_args(kwargs, network_dim=network_dim, network_dropout=neuron_dropout,
                                 source="network_args", dim_source="--network_dim", dropout_source="--network_dropout")
    for note in options.notes:
        log.warning("lycoft: %s", note)
    return options


def _text_encoders(text_encoder: Any) -> list[nn.Module]:
    if text_encoder is None:
        return []
    if isinstance(text_encoder, (list, tuple)):
        return [t for t in text_encoder if t is not None]
    return [text_encoder]


class KohyaNetwork(Network):
    """`Network` plus the methods sd-scripts' train_network.py and gen_img.py call."""

    def __init__(self, family: str, config: AdapterConfig | None = None, preset: str | None = None,
                 multiplier: float = 1.0) -> None:
        super().__init__(family, config, preset)
        self.multiplier = multiplier
        self._backup: dict[str, torch.Tensor] = {}

    # -- creation / application -----------------------------------------------------------------------
    def apply_to(self, text_encoder: Any = None, unet: Any = None, apply_text_encoder: bool = True,
                 apply_unet: bool = True) -> None:
        """Keep only the components being trained, then attach the adapters."""
        for key in list(self.adapters):
            comp = self.components[key]
            if (comp == "unet" and not apply_unet) or (comp != "unet" and not apply_text_encoder):
                del self.adapters[key]
                del self.components[key]
        log.info("lycoft: %s", self.summary())
        self.set_multiplier(self.multiplier)
        self.apply()

    def prepare_network(self, args: Any) -> None:  # noqa: ARG002 - part of the contract
        return None

    def prepare_grad_etc(self, text_encoder: Any = None, unet: Any = None) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder: Any = None, unet: Any = None) -> None:
        self.train()

    def on_step_start(self, text_encoder: Any = None, unet: Any = None) -> None:
        return None

    def get_trainable_params(self) -> list[nn.Parameter]:
        return self.trainable_parameters()

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to do: the adapters are recomputed with the UNet's own checkpointed blocks."""
        return None

    # -- optimizer ------------------------------------------------------------------------------------
    def prepare_optimizer_params_with_multiple_te_lrs(self, text_encoder_lr: Any, unet_lr: float | None,
                                                      default_lr: float | None) -> tuple[list[dict], list[str]]:
        if isinstance(text_encoder_lr, (list, tuple)):
            te_lrs = list(text_encoder_lr)
        else:
            te_lrs = [text_encoder_lr]
        lrs: dict[str, float | None] = {"unet": unet_lr}
        for i in range(2):
            lr = te_lrs[i] if i < len(te_lrs) else te_lrs[0] if te_lrs else None
            lrs[f"te{i + 1}"] = lr
        base = default_lr if default_lr is not None else (unet_lr if unet_lr is not None else 1e-4)
        groups = self.parameter_groups(lrs, base)
        descriptions = [{"unet": "unet", "te1": "textencoder 1", "te2": "textencoder 2"}[g.pop("name")]
                        for g in groups]
        return groups, descriptions

    def prepare_optimizer_params(self, text_encoder_lr: Any, unet_lr: float | None,
                                 default_lr: float | None = None) -> list[dict]:
        groups, _ = self.prepare_optimizer_params_with_multiple_te_lrs(text_encoder_lr, unet_lr, default_lr)
        return groups

    # -- files ----------------------------------------------------------------------------------------
    def save_weights(self, file: str, dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None
                     ) -> None:
        save_network(self, file, metadata=metadata or None, dtype=dtype)

    def load_weights(self, file: str) -> str:
        missing = load_into_network(self, file, strict=False)
        return f"lycoft: loaded {file} ({len(missing)} keys not in this network)"

    # -- inference helpers (gen_img.py, --base_weights) -----------------------------------------------
    def is_mergeable(self) -> bool:
        return True

    @torch.no_grad()
    def merge_to(self, text_encoder: Any = None, unet: Any = None, weights_sd: dict | None = None,
                 dtype: torch.dtype | None = None, device: Any = None) -> None:
        if weights_sd:
            specs = parse_adapter_tensors(weights_sd)
            for key, spec in specs.items():
                if key in self.adapters:
                    self.adapters[key].oft_blocks.copy_(spec.blocks)
                    if spec.rescale is not None and self.adapters[key].rescale is not None:
                        self.adapters[key].rescale.copy_(spec.rescale.reshape(self.adapters[key].rescale.shape))
        self.merge()

    def backup_weights(self) -> None:
        self._backup = {k: layer.base.weight.detach().clone() for k, layer in self.adapters.items()}

    @torch.no_grad()
    def restore_weights(self) -> None:
        for k, w in self._backup.items():
            self.adapters[k].base.weight.copy_(w)

    @torch.no_grad()
    def pre_calculation(self) -> None:
        """gen_img.py: bake the adapters into the weights once (keep `backup_weights` to undo)."""
        self.merge()

    def apply_max_norm_regularization(self, max_norm: float, device: Any = None) -> tuple[int, torch.Tensor,
                                                                                         torch.Tensor]:
        """Rotations keep norms; report ||Q|| statistics and scale nothing (use ``constraint=`` instead)."""
        norms = torch.stack([torch.linalg.vector_norm(layer.skew_blocks().detach())
                             for layer in self.adapters.values()])
        return 0, norms.mean(), norms.max()


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae: Any,
                   text_encoder: Any, unet: Any, neuron_dropout: float | None = None, **kwargs: Any
                   ) -> KohyaNetwork:
    """sd-scripts calls this with ``network_dim`` (block size here), ``network_alpha`` (ignored) and the
    ``--network_args`` as string kwargs."""
    options = network_options(network_dim, kwargs, neuron_dropout)
    if network_alpha not in (None, 1, 1.0):
        log.info("lycoft: network_alpha=%s is ignored by OFT (use --network_args constraint=...)", network_alpha)
    net = inject(unet=unet, text_encoders=_text_encoders(text_encoder), multiplier=multiplier,
                 network_class=KohyaNetwork, apply=False, **options.inject_kwargs())
    assert isinstance(net, KohyaNetwork)
    return net


def create_network_from_weights(multiplier: float, file: str | None, vae: Any, text_encoder: Any, unet: Any,
                                weights_sd: dict | None = None, for_inference: bool = False, **kwargs: Any
                                ) -> tuple[KohyaNetwork, dict]:
    """Rebuild the network a file describes (algo, block sizes, rescale per module) on these models."""
    metadata: dict[str, str] = {}
    if weights_sd is None:
        weights_sd, metadata = read_safetensors(file)
    specs = parse_adapter_tensors(weights_sd, metadata, path=str(file))
    tes = _text_encoders(text_encoder)
    net = KohyaNetwork(detect_family(unet, tes), None, "from-weights", multiplier)
    attach_specs(net, specs, unet, tes, str(file), allow_partial=True)
    return net, weights_sd
