"""``python -m kt_patch doctor``: what this machine runs (CPU, ISA backends, threads, versions) and, with
``--model``, where a model's weights would go under kt_patch."""
from __future__ import annotations

import argparse
import os
from importlib import metadata

import psutil
import torch

from . import options, registry
from .kernel import supported_isas
from .machine import cpu_info, physical_cores_available

PACKAGES = ("kt_patch", "torch", "transformers", "peft", "accelerate", "deepspeed")


def memory_plan(path: str, dtype: torch.dtype, backward_weights: str) -> dict:
    """Where a model's weights go under kt_patch, counted on an empty (meta) model built from its config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with options.suspended(), torch.device("meta"):  # its weights are not real: it must not be patched
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    size = torch.finfo(dtype).bits // 8
    experts = [getattr(block, family.experts) for _, block, family in registry.moe_blocks(model)]
    expert_params = sum(p.numel() for module in experts for p in module.parameters())
    copies = 2 if backward_weights == "copy" else 1
    return {"model": f"{config.model_type} ({type(model).__name__})", "layers": len(experts),
            "experts": sum(module.gate_up_proj.shape[0] for module in experts),
            "kernel_bytes": expert_params * size * copies,
            "accelerator_bytes": (sum(p.numel() for p in model.parameters()) + _saved_buffer_elements(model)
                                  - expert_params) * size}


def _saved_buffer_elements(model) -> int:
    """Elements of the buffers a checkpoint holds (e.g. DeepSeek's routing bias), not recomputed ones (rotary)."""
    return sum(buffer.numel() for module in model.modules() for name, buffer in module._buffers.items()
               if buffer is not None and name not in module._non_persistent_buffers_set)


def _size(nbytes: int) -> str:
    unit, scale = ("GiB", 2**30) if nbytes >= 2**30 else ("MiB", 2**20)
    return f"{nbytes / scale:.2f} {unit} ({nbytes} bytes)"


def _versions() -> str:
    versions = []
    for package in PACKAGES:
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package} -")
    return ", ".join(versions)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kt_patch doctor", description=__doc__)
    ap.add_argument("--model", help="a local checkpoint directory or config.json (no downloads)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    args = ap.parse_args(argv)
    try:
        opts = options.resolve()
    except options.OptionError as error:
        ap.error(str(error))
    plan = None
    if args.model:
        if not os.path.exists(args.model):
            ap.error(f"--model {args.model}: no such checkpoint directory or config file")
        try:
            plan = memory_plan(args.model, getattr(torch, args.dtype), opts.backward_weights)
        except (OSError, ValueError) as error:
            ap.error(f"--model {args.model}: {error}")
    info, isas = cpu_info(), supported_isas()
    print(f"kt_patch doctor\n  cpu            : {info['cpu']} (family {info.get('cpu_family', '?')} model "
          f"{info.get('cpu_model', '?')}), {info['cores']} cpus\n  isas available : {', '.join(isas)}\n"
          f"  isa chosen     : {isas[0] if opts.isa == 'auto' else opts.isa}\n  threads        : {opts.threads} "
          f"(physical cores available: {physical_cores_available()})\n  versions       : {_versions()}\n"
          f"  cuda available : {torch.cuda.is_available()}")
    if plan is not None:
        ram = psutil.virtual_memory().total
        print(f"  model          : {plan['model']}, {plan['layers']} MoE layers, {plan['experts']} routed experts\n"
              f"  host memory    : {_size(plan['kernel_bytes'])} of routed-expert weights in the kernel ({args.dtype},"
              f" backward_weights={opts.backward_weights}, before padding); this machine has {_size(ram)}\n"
              f"  accelerator    : {_size(plan['accelerator_bytes'])} of the other weights ({args.dtype}), before "
              f"LoRA, optimizer state and activations")
        if plan["kernel_bytes"] > ram:
            print(f"  WARNING        : the routed experts need {plan['kernel_bytes'] / ram:.1f}x this machine's memory;"
                  " they will not fit")
    return 0
