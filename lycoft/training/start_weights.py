"""Adapter files a run starts from, beyond a plain warm start: ``--base_weights`` merged into the base model
before the new adapter is built, and ``--network_weights`` with ``--dim_from_weights``: the network the file
describes rather than the one the flags describe.

Both read files with lycoft's adapter reader (`lycoft.formats.lycoris`: lycoft/LyCORIS OFT and BOFT, kohya's
legacy OFT, LyCORIS 2.0 ``oft_diag``); any other kind (LoRA, LoHa, LoKr, full differences, PEFT) is refused
with the file and what it holds, as sd-scripts can only merge the files of the network module it trains.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from lycoft.formats.lycoris import ModuleSpec, read_adapter
from lycoft.io.errors import AdapterFileError
from lycoft.network import Network, attach_specs, load
from lycoft.training.errors import ConfigError
from lycoft.training.flags import TrainConfig

logger = logging.getLogger("lycoft.train")

# network_args keys that describe the network's layers and their shapes: with --dim_from_weights the file's
# modules decide them.
_SHAPE_KEYS = ("algo", "block_size", "block_num", "butterfly_factors", "rescale", "side", "preset", "include",
               "exclude", "conv_block_size", "overrides")


_BASE_HINT = "give an OFT/BOFT adapter file of this model (merge other kinds, such as LoRA, into the checkpoint first)"
_START_HINT = "give an OFT/BOFT adapter file, or drop --dim_from_weights"


def check_start_files(cfg: TrainConfig) -> None:
    """Read every ``--base_weights`` file (and the ``--network_weights`` file with ``--dim_from_weights``)
    before the model loads, so that a LoRA or damaged file is named in seconds."""
    for path in cfg.base_weights:
        _read(path, "--base_weights", _BASE_HINT)
    if cfg.dim_from_weights:
        _read(cfg.network_weights, "--network_weights", _START_HINT)


def _read(path: str, flag: str, hint: str) -> dict[str, ModuleSpec]:
    try:
        return read_adapter(path)[0]
    except AdapterFileError as e:
        raise ConfigError(f"{flag} {e}; {hint}") from None
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot be read ({e.strerror or e}); check the path") from None


def merge_base_weights(cfg: TrainConfig, models: Any) -> None:
    """Bake each ``--base_weights`` file into the base model's weights (in place, in order), at its
    ``--base_weights_multiplier`` (1 when not given)."""
    multipliers = list(cfg.base_weights_multiplier or [])
    for i, path in enumerate(cfg.base_weights):
        multiplier = multipliers[i] if i < len(multipliers) else 1.0
        try:
            merged = load(path, unet=models.unet, text_encoders=models.text_encoders, multiplier=multiplier,
                          family=models.family)
        except AdapterFileError as e:
            raise ConfigError(f"--base_weights {e}; {_BASE_HINT}") from None
        merged.merge()
        logger.info("merged %s into the base model at strength %g (%d layers)", path, multiplier, len(merged.adapters))


def network_from_weights(cfg: TrainConfig, models: Any) -> Network:
    """``--dim_from_weights``: the network of the ``--network_weights`` file (its modules, algo, block sizes,
    butterfly stages, rescale and side), started from the file's values and applied to the model. The parts
    not trained (``--network_train_unet_only`` / ``--network_train_text_encoder_only``) are left out; the
    training options of ``--network_args`` (module_dropout, constraint, path, neumann_terms) apply."""
    path = cfg.network_weights
    specs = _read(path, "--network_weights", _START_HINT)
    trained = {key: spec for key, spec in specs.items() if _is_trained(cfg, key)}
    if not trained:
        raise ConfigError(f"--network_weights {path} has no modules of the part being trained; drop "
                          "--network_train_unet_only / --network_train_text_encoder_only, or give another file")
    options = cfg.network_options()
    unused = [key for key, _ in options.given if key in _SHAPE_KEYS]
    if unused:
        logger.warning("--dim_from_weights: the modules of %s decide the network; network_args %s not used", path,
                       ", ".join(unused))
    settings = _training_settings(options.adapter)
    first = next(iter(trained.values()))
    network = Network(models.family, config=first.config().replace(**settings), preset="from-weights")
    try:
        attach_specs(network, trained, models.unet if not cfg.network_train_text_encoder_only else None,
                     [] if cfg.network_train_unet_only else models.text_encoders, path, settings=settings)
    except (AdapterFileError, ValueError) as e:
        raise ConfigError(f"--network_weights {e}") from None
    logger.info("started from adapter weights %s with the network they describe: %s", path, _shape(trained))
    return network.apply()


def _is_trained(cfg: TrainConfig, key: str) -> bool:
    unet = key.startswith("lora_unet_")
    return not (unet and cfg.network_train_text_encoder_only) and not (not unet and cfg.network_train_unet_only)


def _training_settings(adapter: Any) -> dict[str, Any]:
    """The `AdapterConfig` fields a file does not fix; a constraint only when given (a LyCORIS file may carry
    its own)."""
    settings: dict[str, Any] = {"dropout": adapter.dropout, "path": adapter.path,
                                "neumann_terms": adapter.neumann_terms}
    if adapter.constraint:
        settings["constraint"] = adapter.constraint
    return settings


def _shape(specs: Mapping[str, ModuleSpec]) -> str:
    kinds = sorted({(s.algo, int(s.blocks.shape[-1]), s.layout().stages) for s in specs.values()})
    text = ", ".join(f"{algo} block size {b}" + (f" x {m} stages" if algo == "boft" else "") for algo, b, m in kinds)
    return f"{len(specs)} modules, {text}"
