"""Activation by a DeepSpeed config's ``"kt_patch"`` block: read where the config becomes live, and at
``deepspeed.initialize`` (:mod:`kt_patch.integrations.deepspeed`).

Light on purpose (options only, no torch): the config watch is installed in every program that imports accelerate
(transformers and PEFT do) through ``kt_patch.pth``, and loads the rest of kt_patch only for a config with the block.
"""
from __future__ import annotations

import kt_patch

from . import options as kt_options


def configure_from_config(config) -> None:
    """Apply the ``"kt_patch"`` block of a (live) DeepSpeed config dict: enable kt_patch, or re-resolve its options
    with the block under ``enable()`` keywords and ``KT_*`` variables. Nothing happens for a config without one."""
    if not isinstance(config, dict) or "kt_patch" not in config:
        return
    block = kt_options.check_deepspeed_block(config["kt_patch"])
    if kt_options.deepspeed_block() == block and kt_options.current() is not None:
        return
    previous = kt_options.deepspeed_block()
    kt_options.set_deepspeed_block(block)
    try:
        kt_patch.enable(**kt_options.requested())
    except BaseException:
        kt_options.set_deepspeed_block(previous)
        raise


def watch_configs(accelerate_deepspeed) -> None:
    """Read the block where a DeepSpeed config first becomes live: ``HfDeepSpeedConfig`` (``TrainingArguments(
    deepspeed=...)``, accelerate's DeepSpeed plugin, an explicit ``HfDeepSpeedConfig`` before ``from_pretrained``)."""
    cls = accelerate_deepspeed.HfDeepSpeedConfig
    if getattr(cls.__init__, "_kt_patch", False):
        return
    original = cls.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        configure_from_config(getattr(self, "config", None))

    __init__._kt_patch = True
    cls.__init__ = __init__
