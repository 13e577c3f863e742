"""Patch models built by transformers: after ``from_pretrained`` and after ``from_config`` (``_from_config``).

Wrapping ``PreTrainedModel.from_pretrained`` catches the Auto classes and direct class calls alike; Auto
``from_config`` goes through ``PreTrainedModel._from_config``. Composite models build their sub-models through the
same entry points while they are being constructed (weights not loaded yet), so only the outermost call patches.

``PeftAdapterMixin.load_adapter`` (``model.load_adapter``), where it leaves PEFT's modules_to_save weights unloaded
(transformers before 5.18.0): it runs marked, so that :mod:`kt_patch.integrations.peft` refuses to inject an adapter
with LoRA Experts there instead of losing them.

Gradient checkpointing: ``PreTrainedModel._set_gradient_checkpointing`` (where ``gradient_checkpointing_enable`` and
``activation_checkpointing_enable`` land) gives a patched model's layers a checkpoint function that tells its MoE
layers which pass they run in (see :mod:`kt_patch.integrations.checkpointing`, which also wraps
``torch.utils.checkpoint.checkpoint`` for direct calls).
"""
from __future__ import annotations

import inspect
import logging
import threading

import torch
from packaging.version import Version
from torch import nn

from .. import options
from ..patcher import patch_model
from .checkpointing import wrap_model_checkpoint_function

logger = logging.getLogger("kt_patch")
_nesting = threading.local()
# The first transformers whose model.load_adapter loads the weights of PEFT's modules_to_save (so LoRA Experts); older
# ones leave them out, with only an "UNEXPECTED" line in their load report.
TRANSFORMERS_LOADING_MODULES_TO_SAVE = "5.18.0"
_adapter_loader = threading.local()
_PLACEMENT_POLICIES = ("auto", "balanced", "balanced_low_0", "sequential")


def install(modeling_utils, patches) -> None:
    import transformers  # imported already (modeling_utils is its module); at module level it would be for every user

    patches.wrap(modeling_utils.PreTrainedModel, "from_pretrained", _patch_loaded_model)
    patches.wrap(modeling_utils.PreTrainedModel, "_from_config", _patch_built_model)
    patches.wrap(modeling_utils.PreTrainedModel, "_set_gradient_checkpointing", _set_gradient_checkpointing)
    if Version(transformers.__version__) < Version(TRANSFORMERS_LOADING_MODULES_TO_SAVE):
        patches.wrap(modeling_utils.PeftAdapterMixin, "load_adapter", _load_adapter_without_modules_to_save)


def _load_adapter_without_modules_to_save(wrapped, instance, args, kwargs):
    _adapter_loader.drops_modules_to_save = True
    try:
        return wrapped(*args, **kwargs)
    finally:
        _adapter_loader.drops_modules_to_save = False


def loading_adapter_without_modules_to_save() -> bool:
    """Whether an adapter is being injected by a ``model.load_adapter`` that will not load its modules_to_save
    weights (transformers older than ``TRANSFORMERS_LOADING_MODULES_TO_SAVE``)."""
    return getattr(_adapter_loader, "drops_modules_to_save", False)


def _set_gradient_checkpointing(wrapped, instance, args, kwargs):
    arguments = inspect.signature(wrapped).bind(*args, **kwargs)
    arguments.apply_defaults()
    if arguments.arguments.get("enable") and "gradient_checkpointing_func" in arguments.arguments:
        arguments.arguments["gradient_checkpointing_func"] = wrap_model_checkpoint_function(
            instance, arguments.arguments["gradient_checkpointing_func"])
    return wrapped(*arguments.args, **arguments.kwargs)


def _single_device(device_map) -> torch.device | None:
    """The device of a ``device_map`` that puts the whole model on one accelerator, else None."""
    if isinstance(device_map, dict) and set(device_map) == {""}:
        device_map = device_map[""]
    if isinstance(device_map, int) and not isinstance(device_map, bool):
        return torch.device("cuda", device_map)
    if isinstance(device_map, torch.device) or (isinstance(device_map, str) and device_map not in _PLACEMENT_POLICIES):
        device = torch.device(device_map)
        return device if device.type not in ("cpu", "meta", "disk") else None
    return None


def _on_host(device_map) -> bool:
    """Whether a ``device_map`` puts every weight in host memory, as loading without one does."""
    if isinstance(device_map, dict):
        return all(_on_host(device) for device in device_map.values())
    if isinstance(device_map, torch.device):
        return device_map.type == "cpu"
    return device_map is None or (isinstance(device_map, str) and device_map.partition(":")[0] == "cpu")


def _patch_loaded_model(wrapped, instance, args, kwargs):
    device = None
    if getattr(_nesting, "depth", 0) == 0 and options.current() is not None:
        device = _single_device(kwargs.get("device_map"))
        if device is not None and kwargs.get("quantization_config") is None:
            # Load into host memory and move only the non-expert part afterwards, so that routed experts never
            # occupy the accelerator, not even while loading.
            kwargs = {k: v for k, v in kwargs.items() if k != "device_map"}
        else:
            device = None
            if not _on_host(kwargs.get("device_map")):
                logger.warning("kt_patch: device_map=%r loads routed experts onto the accelerator before they move "
                               "into the CPU kernel; load on the CPU (or a single device) to avoid that peak",
                               kwargs["device_map"])
    result = _patch_built_model(wrapped, instance, args, kwargs)
    if device is not None:
        (result[0] if isinstance(result, tuple) else result).to(device)
    return result


def _patch_built_model(wrapped, instance, args, kwargs):
    depth = getattr(_nesting, "depth", 0)
    _nesting.depth = depth + 1
    try:
        result = wrapped(*args, **kwargs)
    finally:
        _nesting.depth = depth
    if depth == 0:
        in_force = options.current()
        # from_pretrained(..., output_loading_info=True) returns (model, loading_info)
        model = result[0] if isinstance(result, tuple) else result
        if in_force is not None and isinstance(model, nn.Module):
            patch_model(model, in_force)
    return result
