"""Wrapt post-import hooks into foreign libraries; one module per library.

Hooks are registered once per process and fire when (or immediately if) the target module is imported. Every wrapper
installed is remembered with the original attribute, so ``kt_patch.disable()`` puts the stock objects back.
"""
from __future__ import annotations

import sys

import wrapt

from . import checkpointing, ddp
from . import deepspeed as deepspeed_integration
from . import peft as peft_integration
from . import transformers as transformers_integration

# target module -> function(module, patches) that wraps what kt_patch needs in it
_HOOKS = {
    "transformers.modeling_utils": transformers_integration.install,
    "torch.utils.checkpoint": checkpointing.install_torch_hook,
    "torch.nn.parallel.distributed": ddp.install,
    "peft.tuners.tuners_utils": peft_integration.install_tuner_hook,
    "peft.peft_model": peft_integration.install_peft_model_hook,
    "peft.tuners.lora.layer": peft_integration.install_merge_hook,
    "deepspeed.runtime.engine": deepspeed_integration.install,
    "accelerate.utils.deepspeed": deepspeed_integration.install,
}


class Patches:
    """Wrapt wrappers put on foreign classes/modules, with the originals to restore."""

    def __init__(self):
        self._originals: list[tuple[object, str, object]] = []

    def wrap(self, owner, attr: str, wrapper) -> None:
        # vars() keeps the raw descriptor (a classmethod stays a classmethod when restored).
        self._originals.append((owner, attr, vars(owner)[attr]))
        wrapt.wrap_function_wrapper(owner, attr, wrapper)

    def restore(self) -> None:
        while self._originals:
            owner, attr, original = self._originals.pop()
            setattr(owner, attr, original)


_patches = Patches()
_registered = False
_installed: set[str] = set()
_active = False


def _on_import(module_name: str):
    def hook(module):
        if _active and module_name not in _installed:
            _HOOKS[module_name](module, _patches)
            _installed.add(module_name)

    return hook


def install() -> None:
    global _registered, _active
    _active = True
    if not _registered:
        for module_name in _HOOKS:
            wrapt.register_post_import_hook(_on_import(module_name), module_name)  # fires now if already imported
        _registered = True
    else:
        for module_name in _HOOKS:
            if module_name in sys.modules:
                _on_import(module_name)(sys.modules[module_name])


def uninstall() -> None:
    global _active
    _active = False
    _patches.restore()
    _installed.clear()
