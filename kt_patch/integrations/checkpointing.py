"""Activation checkpointing: checkpoint functions run their function in a :class:`kt_patch.phase.CheckpointRegion`,
so kt_patch MoE layers know which pass they run in.

Two hooks put the region there, both undone by ``kt_patch.disable()``:

* HF ``gradient_checkpointing_enable()`` / ``activation_checkpointing_enable()`` (reentrant or not): the function
  transformers stores as ``_gradient_checkpointing_func`` is wrapped when it is set on a patched model (installed by
  :mod:`kt_patch.integrations.transformers`, through :func:`wrap_model_checkpoint_function`);
* ``torch.utils.checkpoint.checkpoint`` called through its module (``torch.utils.checkpoint.checkpoint(fn, ...)``).
"""
from __future__ import annotations

import torch

from ..layer import KtMoeLayer
from ..phase import region_function, signalling_checkpoint


def install_torch_hook(checkpoint_module, patches) -> None:
    """``torch.utils.checkpoint.checkpoint`` runs its function in a region."""
    patches.wrap(checkpoint_module, "checkpoint", _checkpoint_wrapper)


def _checkpoint_wrapper(wrapped, instance, args, kwargs):
    if not args or not torch.is_grad_enabled():
        return wrapped(*args, **kwargs)
    return wrapped(region_function(args[0]), *args[1:], **kwargs)


def wrap_model_checkpoint_function(model, checkpoint_function):
    """HF's ``_set_gradient_checkpointing``: the function given to a patched model's layers signals the phase."""
    if checkpoint_function is None or not any(isinstance(m, KtMoeLayer) for m in model.modules()):
        return checkpoint_function
    return signalling_checkpoint(checkpoint_function)
