"""kt_patch: LoRA fine-tuning of Mixture-of-Experts models with the routed experts in a CPU kernel.

``kt_patch.enable(**options)`` (or ``KT_ENABLE=1``) patches transformers / PEFT through post-import hooks;
``kt_patch.disable()`` restores them. Options: see ``kt_patch.options.Options``.

``import kt_patch`` loads only the options: the hooks (and with them torch and the kernel) are loaded by
``enable()``, so that the ``KT_ENABLE`` start-up hook costs nothing in programs that never train.
"""
from __future__ import annotations

import logging

from . import options as _options
from .options import OptionError, Options

logger = logging.getLogger("kt_patch")


class _UnconfiguredLoggingHandler(logging.StreamHandler):
    """kt_patch's lines on stderr for as long as the root logger has no handler.

    Records always propagate, so once the script configures logging (often after ``enable()``, which under
    ``KT_ENABLE`` runs when transformers is first imported) they come out through its handlers, in its format, and
    this handler stays silent.
    """

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers:
            super().emit(record)


def enable(**options) -> Options:
    """Validate the options and install the hooks; calling it again replaces the options."""
    resolved = _options.resolve(options, deepspeed_block=_options.deepspeed_block())
    _options.set_requested(options)
    from . import integrations  # the deliberate deferral described in the module docstring

    _options.set_current(resolved)
    logger.setLevel(resolved.log_level)
    if not logger.handlers:
        logger.addHandler(_UnconfiguredLoggingHandler())
    integrations.install()
    return resolved


def disable() -> None:
    """Remove the hooks; models loaded afterwards are stock (models already patched stay patched)."""
    from . import integrations

    _options.set_current(None)
    integrations.uninstall()


def current_options() -> Options | None:
    """The options in force, or None while kt_patch is disabled."""
    return _options.current()


__all__ = ["OptionError", "Options", "current_options", "disable", "enable"]
