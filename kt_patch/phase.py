"""Which pass a kt_patch MoE layer runs in under activation checkpointing.

Under checkpointing a decoder layer's forward runs twice: once in the forward (the *first forward*, whose activations
torch drops) and again during the backward (the *recompute*, whose activations the backward uses). The CPU side must
know which run it is in, to keep its activation cache only where a backward will read it (see
:mod:`kt_patch.autograd` for the policies).

Explicit signal. A checkpointed function wrapped by :func:`region_function` runs in a :class:`CheckpointRegion`: its
first call is the first forward, every later call a recompute. :mod:`kt_patch.integrations.checkpointing` puts the
wrap where checkpoint functions are called (HF's ``gradient_checkpointing_enable()`` /
``activation_checkpointing_enable()``, reentrant or not, and ``torch.utils.checkpoint.checkpoint``).

The region is owned by torch's checkpoint machinery (the non-reentrant frame's recompute function, the reentrant
node's ``run_function``), so whatever a region keeps lives exactly as long as the autograd graph that may use it.
A first call that records autograd without torch.utils.checkpoint's hook was not checkpointed (a checkpoint function
that just calls its argument): it is a plain forward. Nested checkpointed regions are untested.

Fallback, for checkpoint functions bound before ``kt_patch.enable()`` (``from torch.utils.checkpoint import
checkpoint``): torch's private autograd state, read only where it exists. A backward is executing
(``torch._C._current_graph_task_id() != -1``): recompute. torch.utils.checkpoint's own saved-tensors hook is on top
(``_checkpoint_hook``): non-reentrant first forward. Autograd not recording: inference, which is also how the
reentrant first forward looks; that is safe because the reentrant recompute builds a graph of its own. Without the
explicit signal the ``retain`` policy cannot pair the two runs and behaves like ``recompute``.

A saved-tensors hook that is not torch.utils.checkpoint's (``save_on_cpu`` or a user's) hides the phase and would
carry the layer's saved state through code kt_patch does not know, so it is an error (:class:`CheckpointPhaseError`)
while autograd records, instead of a gradient that might be wrong.
"""
from __future__ import annotations

import enum
import functools
import logging
import threading

import torch

logger = logging.getLogger("kt_patch")


class Phase(enum.Enum):
    INFERENCE = "inference"  # autograd does not record: nothing is kept for a backward
    PLAIN = "plain"  # autograd records, no checkpointing
    FIRST_FORWARD = "first forward"  # first run of a checkpointed region
    RECOMPUTE = "recompute"  # the region running again for the backward


class CheckpointPhaseError(RuntimeError):
    """kt_patch cannot tell which checkpointing pass a MoE layer runs in, or cannot pair the two passes."""


class CheckpointRegion:
    """One checkpointed call: its first forward and every recompute of it.

    Under the ``retain`` policy each MoE layer's first forward keeps its output and activation cache here, in call
    order; the recompute takes them back in the same order instead of running the experts again.
    """

    def __init__(self):
        self.calls = 0
        self._kept: list = []
        self._cursor = 0

    def start_call(self) -> Phase:
        self.calls += 1
        self._cursor = 0
        return Phase.FIRST_FORWARD if self.calls == 1 else Phase.RECOMPUTE

    def keep(self, kernel, output: torch.Tensor, cache) -> None:
        """First forward: what this MoE call produced, for the recompute (None placeholders keep the order)."""
        self._kept.append(None if cache is None else (kernel, output, cache))

    def take_kept(self, kernel, tokens: int):
        """Recompute: ``(output, cache)`` the same MoE call kept in the first forward, or None if it kept nothing."""
        index, self._cursor = self._cursor, self._cursor + 1
        if index >= len(self._kept) or self._kept[index] is None:
            return None
        kept_kernel, output, cache = self._kept[index]
        self._kept[index] = None  # given to the backward; nothing stays behind in the region
        if kept_kernel is not kernel or output.shape[0] != tokens:
            raise CheckpointPhaseError(
                f"{kernel.name}: the recompute of a checkpointed region called the MoE layers in a different order "
                f"or with other inputs than its first forward (expected {kept_kernel.name} with {output.shape[0]} "
                f"tokens); the checkpointed function must be deterministic for checkpoint_policy='retain'")
        return output, cache


_state = threading.local()


def _region_stack() -> list:
    if not hasattr(_state, "regions"):
        _state.regions = []
    return _state.regions


def region_function(function):
    """``function`` wrapped so that MoE layers inside know their phase; each wrap is one new region."""
    if getattr(function, "kt_checkpoint_region", None) is not None:
        return function
    region = CheckpointRegion()

    @functools.wraps(function)
    def run_in_region(*args, **kwargs):
        stack = _region_stack()
        stack.append((region, region.start_call()))
        try:
            return function(*args, **kwargs)
        finally:
            stack.pop()

    run_in_region.kt_checkpoint_region = region
    # Checkpoint functions that look at the module they run (LLaMA-Factory's reads ``fn.__self__`` or, for a
    # partial, ``fn.func.__self__``) find it on the wrapper as on what it wraps.
    for attribute in ("__self__", "func"):
        if hasattr(function, attribute):
            setattr(run_in_region, attribute, getattr(function, attribute))
    if not hasattr(function, "__self__") and hasattr(getattr(function, "func", None), "__self__"):
        run_in_region.__self__ = function.func.__self__
    return run_in_region


def signalling_checkpoint(checkpoint_function):
    """A checkpoint function (``checkpoint(fn, *args, **kwargs)`` signature) whose ``fn`` runs in a region."""
    if getattr(checkpoint_function, "kt_signals_phase", False):
        return checkpoint_function

    @functools.wraps(checkpoint_function)
    def checkpoint_with_phase_signal(function, *args, **kwargs):
        if not torch.is_grad_enabled():  # torch runs the function once, as a plain no-grad call
            return checkpoint_function(function, *args, **kwargs)
        return checkpoint_function(region_function(function), *args, **kwargs)

    checkpoint_with_phase_signal.kt_signals_phase = True
    return checkpoint_with_phase_signal


_WARNED = set()


def _warn_once(key: str, message: str, *args) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        logger.warning(message, *args)


_HOOKS_UNREADABLE = "<saved-tensors hooks not readable in this torch>"


def _top_saved_tensors_hook() -> str | None:
    """``module.qualname`` of the innermost saved-tensors pack hook, None when there is none."""
    top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top_hooks is None:
        return _HOOKS_UNREADABLE
    hooks = top_hooks(False)
    if hooks is None:
        return None
    pack = hooks[0]
    return f"{getattr(pack, '__module__', '?')}.{getattr(pack, '__qualname__', type(pack).__name__)}"


_CHECKPOINT_HOOKS = {
    Phase.FIRST_FORWARD: "torch.utils.checkpoint._checkpoint_hook.",
    Phase.RECOMPUTE: "torch.utils.checkpoint._recomputation_hook.",
}


def _backward_running() -> bool | None:
    graph_task_id = getattr(torch._C, "_current_graph_task_id", None)
    return None if graph_task_id is None else graph_task_id() != -1


def _foreign_hook_error(layer_name: str, hook: str) -> CheckpointPhaseError:
    return CheckpointPhaseError(
        f"{layer_name}: a saved-tensors hook that is not torch.utils.checkpoint's is active ({hook}); kt_patch cannot "
        "tell which checkpointing pass its MoE layer runs in, nor keep the expert activations through that hook. Run "
        "the model without it (use gradient_checkpointing_enable()/activation_checkpointing_enable() or "
        "torch.utils.checkpoint.checkpoint for checkpointing)")


def current_phase(layer_name: str, policy: str) -> tuple[Phase, CheckpointRegion | None]:
    """The pass a MoE layer runs in now, and the checkpoint region when kt_patch's signal names one.

    Raises :class:`CheckpointPhaseError` where the phase cannot be known while autograd records.
    """
    stack = _region_stack()
    grad = torch.is_grad_enabled()
    if stack:
        region, phase = stack[-1]
        if not grad:  # the reentrant first forward: nothing is saved, so no hook matters
            return phase, region
        hook = _top_saved_tensors_hook()
        if hook is None and phase is Phase.FIRST_FORWARD:
            return Phase.PLAIN, None  # a checkpoint function that runs the region as it is: nothing is recomputed
        if hook not in (None, _HOOKS_UNREADABLE) and not hook.startswith(_CHECKPOINT_HOOKS[phase]):
            raise _foreign_hook_error(layer_name, hook)
        return phase, region
    if not grad:
        return Phase.INFERENCE, None
    hook = _top_saved_tensors_hook()
    if hook == _HOOKS_UNREADABLE:
        _warn_once("no-hook-api", "kt_patch: this torch does not expose its saved-tensors hooks; checkpointed "
                                  "regions are seen only through kt_patch's own checkpoint signal")
        return (Phase.RECOMPUTE if _backward_running() else Phase.PLAIN), None
    if _backward_running() or (hook is not None and hook.startswith(_CHECKPOINT_HOOKS[Phase.RECOMPUTE])):
        if hook is not None and not hook.startswith(_CHECKPOINT_HOOKS[Phase.RECOMPUTE]):
            raise _foreign_hook_error(layer_name, hook)
        phase = Phase.RECOMPUTE
    elif hook is None:
        return Phase.PLAIN, None
    elif hook.startswith(_CHECKPOINT_HOOKS[Phase.FIRST_FORWARD]):
        phase = Phase.FIRST_FORWARD
    else:
        raise _foreign_hook_error(layer_name, hook)
    if policy == "retain":
        _warn_once("retain-fallback", "kt_patch: a checkpoint function bound before kt_patch.enable() runs the MoE "
                                      "layers; checkpoint_policy='retain' needs kt_patch's signal and acts as "
                                      "'recompute' there")
    return phase, None
