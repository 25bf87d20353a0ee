"""``--network_weights``: start training from an adapter file's values instead of the identity.

Only a file made for this network is a warm start: an adapter of another model family, or one whose
modules mostly name layers this network does not adapt, would leave the run training from scratch while
the user believes otherwise, so it is refused with the file, its family and the model's. A partial match
(at most half of the file's modules are not in this network) is a warning with the count; the network's
layers the file does not cover start at the identity. A file that is not an OFT/BOFT adapter, or is damaged
(NaN blocks), is refused by the reader; one of another block size or algo when its values are copied.
"""

from __future__ import annotations

import logging

from lycoft.base_model import family_of_adapter
from lycoft.formats.lycoris import ModuleSpec, read_adapter
from lycoft.io.errors import AdapterFileError
from lycoft.network import Network
from lycoft.training.errors import ConfigError

logger = logging.getLogger("lycoft.train")


def read_network_weights(path: str, family: str | None, model: str) -> dict[str, ModuleSpec]:
    """The modules of the adapter file `path`, checked to be an OFT/BOFT adapter for a `family` model
    (`model`; None: not known yet); raises `ConfigError` naming the file otherwise."""
    try:
        specs, metadata = read_adapter(path)
    except AdapterFileError as e:
        raise ConfigError(f"--network_weights {e}; give an OFT/BOFT adapter file for this model, or drop "
                          "--network_weights") from None
    except OSError as e:
        raise ConfigError(f"--network_weights {path}: cannot be read ({e.strerror or e}); check the path") from None
    file_family = family_of_adapter(metadata)
    if family is not None and file_family is not None and file_family != family:
        raise ConfigError(f"--network_weights {path} is an {file_family} adapter, but {model} is an {family} model; "
                          f"give an adapter trained on an {family} model, or drop --network_weights")
    return specs


def load_network_weights(network: Network, path: str, model: str) -> None:
    """Copy the adapter file `path` into `network` (whose base model is `model`), or raise `ConfigError`."""
    specs = read_network_weights(path, network.family, model)
    unknown = [key for key in specs if key not in network.adapters]
    matched = len(specs) - len(unknown)
    if matched * 2 < len(specs):
        raise ConfigError(
            f"--network_weights {path}: only {matched} of its {len(specs)} modules are layers this "
            f"{network.family} network adapts ({model}, preset {network.preset}); it was made for another model "
            "family or layer selection. Give an adapter of this model made with the same preset, or drop "
            "--network_weights")
    try:
        network.load_file(path, strict=False)
    except AdapterFileError as e:
        raise ConfigError(f"--network_weights {e}") from None
    untouched = len(network.adapters) - matched
    if unknown:
        logger.warning("started from adapter weights %s: %d of its %d modules are not in this network and were "
                       "ignored (first: %s)", path, len(unknown), len(specs), unknown[0])
    else:
        logger.info("started from adapter weights %s", path)
    if untouched:
        logger.info("%d of the network's %d adapted layers are not in %s and start at the identity", untouched,
                    len(network.adapters), path)
