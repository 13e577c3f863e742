"""Patch models built by transformers: after ``from_pretrained`` and after ``from_config`` (``_from_config``).

Wrapping ``PreTrainedModel.from_pretrained`` catches the Auto classes and direct class calls alike; Auto
``from_config`` goes through ``PreTrainedModel._from_config``. Composite models build their sub-models through the
same entry points while they are being constructed (weights not loaded yet), so only the outermost call patches.
"""
from __future__ import annotations

import threading

from torch import nn

_nesting = threading.local()


def install(modeling_utils, patches) -> None:
    patches.wrap(modeling_utils.PreTrainedModel, "from_pretrained", _patch_built_model)
    patches.wrap(modeling_utils.PreTrainedModel, "_from_config", _patch_built_model)


def _patch_built_model(wrapped, instance, args, kwargs):
    depth = getattr(_nesting, "depth", 0)
    _nesting.depth = depth + 1
    try:
        result = wrapped(*args, **kwargs)
    finally:
        _nesting.depth = depth
    if depth == 0:
        from .. import current_options
        from ..patcher import patch_model

        options = current_options()
        # from_pretrained(..., output_loading_info=True) returns (model, loading_info)
        model = result[0] if isinstance(result, tuple) else result
        if options is not None and isinstance(model, nn.Module):
            patch_model(model, options)
    return result
