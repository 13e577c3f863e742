"""torch DistributedDataParallel: keep the routed experts' weight placeholders out of DDP's start-up broadcast.

A patched model's routed-expert weights are one-element placeholders expanded to the weights' shape (the values live
in the kernel; see :func:`kt_patch.layer.weight_placeholder`), and DDP's broadcast of every parameter from rank 0
cannot write into them. They are frozen and the same on every rank, so DDP is told to ignore them, through its
``_set_params_and_buffers_to_ignore_for_model`` (names the caller already gave it are kept).

Every rank holds its own kernel and computes its own tokens; the expert-LoRA factors are ordinary parameters, so DDP
averages their gradients like any other's. They live in host memory, which DDP's gloo backend reduces and NCCL does
not.
"""
from __future__ import annotations


def install(distributed_module, patches) -> None:
    patches.wrap(distributed_module.DistributedDataParallel, "__init__", _ignore_expert_placeholders)


def _ignore_expert_placeholders(wrapped, instance, args, kwargs):
    from ..layer import KtMoeLayer, is_placeholder

    module = args[0] if args else kwargs.get("module")
    if module is not None:
        placeholders = {f"{layer_name}.{name}" for layer_name, layer in module.named_modules()
                        if isinstance(layer, KtMoeLayer)
                        for name, param in layer.named_parameters() if is_placeholder(param)}
        if placeholders:
            given = set(vars(module).get("_ddp_params_and_buffers_to_ignore", ()))  # not a wrapped model's
            type(instance)._set_params_and_buffers_to_ignore_for_model(module, sorted(given | placeholders))
    return wrapped(*args, **kwargs)
