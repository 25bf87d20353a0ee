"""Entry point the webui loads from `extensions/sd-webui-lycoft/scripts/`: hooks lycoft into the UI's LoRA
loading now, and again once every extension is loaded (the built-in Lora extension may load after this one).
"""

import logging

import lycoft_webui

log = logging.getLogger("lycoft")


def _install(*_args: object) -> None:
    hooked = lycoft_webui.install()
    if hooked:
        log.info("lycoft: OFT/BOFT files load with lycoft's semantics (%s)", ", ".join(hooked))
    else:
        log.warning("lycoft: no supported LoRA loader found; OFT files load as this UI reads them")


_install()
try:
    from modules import script_callbacks

    script_callbacks.on_before_ui(_install)
except ImportError:  # outside a webui (tests)
    pass
