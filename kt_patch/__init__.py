"""kt_patch: LoRA fine-tuning of Mixture-of-Experts models with the routed experts in a CPU kernel.

``kt_patch.enable(**options)`` (or ``KT_ENABLE=1``) patches transformers / PEFT through post-import hooks;
``kt_patch.disable()`` restores them. Options: see ``kt_patch.options.Options``.
"""
from __future__ import annotations

import logging

from .options import Options, OptionError, resolve

_options: Options | None = None
logger = logging.getLogger("kt_patch")


def enable(**options) -> Options:
    """Validate the options and install the hooks; calling it again replaces the options."""
    global _options
    _options = resolve(options)
    logger.setLevel(_options.log_level)
    if not logger.handlers and not logging.getLogger().handlers:
        # Nothing configured: show the summary lines on stderr; not propagated, so that a logging.basicConfig() made
        # later does not print them twice.
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    from . import integrations

    integrations.install()
    return _options


def disable() -> None:
    """Remove the hooks; models loaded afterwards are stock (models already patched stay patched)."""
    global _options
    _options = None
    from . import integrations

    integrations.uninstall()


def current_options() -> Options | None:
    """The options in force, or None while kt_patch is disabled."""
    return _options


__all__ = ["Options", "OptionError", "current_options", "disable", "enable"]
