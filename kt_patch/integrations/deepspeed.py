"""DeepSpeed (ZeRO 0, 1, 2, 3, zero.Init) on a patched model, and activation by the config's ``"kt_patch"`` block.

Routed experts are kept out of DeepSpeed entirely. Their module (the weight placeholders, the kernel holds the
values, and PEFT's expert-LoRA factors, which the kernel reads in host memory) is detached from its ``KtMoeLayer``
while ``DeepSpeedEngine.__init__`` runs, so DeepSpeed never casts, moves, broadcasts, partitions or counts them, and
registers no ZeRO-3 hooks on them; its trainable parameters are taken out of the optimizer's (or
``model_parameters``') groups before DeepSpeed flattens them. The one DeepSpeed routine that walks the module's
parameters at every step (stage 0's gradient all-reduce) runs with them detached again.

Expert-LoRA parameters are therefore *not* in DeepSpeed's optimizer, deliberately: ZeRO 1/2 would copy them into
flat buffers on the accelerator and ZeRO-3 would partition them there, while the kernel reads them in host memory
(and their Adam states, 2x their size, would take accelerator memory). kt_patch steps them with a companion
optimizer of the same class and hyper-parameters (the client optimizer's class, or torch's Adam/AdamW for a
DeepSpeed-config ``Adam``/``AdamW``), reading each group's live hyper-parameters (``lr`` under a scheduler) from
DeepSpeed's optimizer at every step. At each optimizer step (the gradient-accumulation boundary) their gradients are
averaged once across the data-parallel ranks on a gloo group, then clipped with DeepSpeed's: stage 0 (fp32) clips
them in its own ``clip_fp32_gradients`` (they are module parameters again by then), ZeRO 1/2/3 clip by the norm of
DeepSpeed's gradients and ours together (and ``get_global_grad_norm()`` reports that joint norm). ZeRO-3's
consolidated state dict (``save_model`` / ``save_16bit_model``) gets them from here. ``save_checkpoint`` /
``load_checkpoint`` run with the experts detached and carry the expert LoRA's values and the companion optimizer's
state under the client-state key ``kt_patch_expert_lora``.

Refused: ZeRO-Infinity parameter offload (``offload_param``) and pipeline parallelism with patched experts, and fp16
(loss scaling) with expert LoRA.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import math

import torch
import torch.distributed as dist

from .. import options as kt_options
from .. import peers
from .._deepspeed_config import configure_from_config, watch_configs
from ..layer import KtMoeLayer
from ..patcher import patch_model
from ..options import OptionError

logger = logging.getLogger("kt_patch")

_installed_engine = False


# -- the engine ---------------------------------------------------------------------------------------------------


def install_engine(engine_module) -> None:
    """Wrap ``DeepSpeedEngine`` once per process; the wrappers do nothing while kt_patch is disabled."""
    global _installed_engine
    engine = engine_module.DeepSpeedEngine
    if _installed_engine or getattr(engine.__init__, "_kt_patch", False):
        return
    for name, wrapper in (("__init__", _engine_init), ("_get_gradients_for_reduction", _with_experts_detached),
                          ("_take_model_step", _take_model_step),
                          ("_zero3_consolidated_16bit_state_dict", _zero3_state_dict),
                          ("save_checkpoint", _save_checkpoint), ("load_checkpoint", _load_checkpoint)):
        original = getattr(engine, name)
        replacement = _bind(wrapper, original)
        replacement._kt_patch = True
        setattr(engine, name, replacement)
    # ZeRO-3 releases every parameter of the module at each step (DeepSpeedZeRoOffload.partition_all_parameters)
    from deepspeed.runtime.zero import parameter_offload

    offload = parameter_offload.DeepSpeedZeRoOffload
    replacement = _bind(_offload_with_experts_detached, offload.partition_all_parameters)
    replacement._kt_patch = True
    offload.partition_all_parameters = replacement
    _installed_engine = True


def install(module, patches) -> None:
    """Hook for ``integrations._HOOKS`` (kt_patch enabled by ``enable()`` / ``KT_ENABLE``)."""
    if module.__name__ == "deepspeed.runtime.engine":
        install_engine(module)
    else:
        watch_configs(module)


def _bind(wrapper, original):
    def method(self, *args, **kwargs):
        return wrapper(original, self, args, kwargs)

    method.__name__, method.__doc__, method.__wrapped__ = original.__name__, original.__doc__, original
    return method


def _kt_layers(model):
    return [module for module in model.modules() if isinstance(module, KtMoeLayer)]


@contextlib.contextmanager
def _detached(layers):
    """The routed-experts modules taken out of their layers' ``_modules`` (so out of ``parameters()``,
    ``modules()``...) for the block, put back in place after it."""
    taken = []
    try:
        for layer in layers:
            name = layer.family.experts
            if name in layer._modules:
                order = list(layer._modules)
                taken.append((layer, name, order, layer._modules.pop(name)))
        yield
    finally:
        for layer, name, order, experts in reversed(taken):
            others = dict(layer._modules)
            others[name] = experts
            layer._modules.clear()
            for key in order:  # original order: named_modules / state_dict order unchanged
                layer._modules[key] = others.pop(key)
            layer._modules.update(others)  # children added meanwhile


def _with_experts_detached(original, engine, args, kwargs):
    state = getattr(engine, "_kt_patch_experts", None)
    if state is None:
        return original(engine, *args, **kwargs)
    with _detached(state.layers):
        return original(engine, *args, **kwargs)


def _offload_with_experts_detached(original, offload, args, kwargs):
    layers = getattr(offload.module, "_kt_patch_ds_layers", None)
    if not layers:
        return original(offload, *args, **kwargs)
    with _detached(layers):
        return original(offload, *args, **kwargs)


def _engine_init(original, engine, args, kwargs):
    bound = inspect.signature(original).bind(engine, *args, **kwargs)
    arguments = bound.arguments
    config_class = arguments.get("config_class")
    config = getattr(config_class, "_param_dict", None) if config_class is not None else arguments.get("config")
    configure_from_config(config)
    in_force = kt_options.current()
    model = arguments.get("model")
    if in_force is None or not isinstance(model, torch.nn.Module):
        return original(*bound.args, **bound.kwargs)

    if not _kt_layers(model):
        patch_model(_base_model(model), in_force)  # a model built before kt_patch was enabled (by this config)
    layers = _kt_layers(model)
    if not layers:
        return original(*bound.args, **bound.kwargs)
    _refuse_unsupported(model, config if isinstance(config, dict) else {}, engine)
    for layer in layers:  # the companion optimizer below steps them in host memory
        layer.keep_expert_lora_on_host()

    expert_params = {}  # id -> (name, param), every parameter of every routed-experts module
    for layer_name, layer in model.named_modules():
        if isinstance(layer, KtMoeLayer):
            prefix = ".".join(filter(None, (layer_name, layer.family.experts)))
            for name, param in layer._modules[layer.family.experts].named_parameters(prefix=prefix):
                expert_params[id(param)] = (name, param)
    trainable = {key: value for key, value in expert_params.items() if value[1].requires_grad}
    if trainable and _fp16_enabled(config):
        raise OptionError("kt_patch: fp16 (loss scaling) with LoRA on routed experts is not supported under "
                          "DeepSpeed; train in bf16 or fp32")

    optimizer, groups = _take_out_of_optimizer(arguments, trainable)
    model.__dict__["_kt_patch_ds_layers"] = layers  # not a module attribute: nn.Module's __setattr__ would register
    with _detached(layers):
        result = original(*bound.args, **bound.kwargs)
    engine._kt_patch_experts = _ExpertLora(engine, layers, trainable, optimizer, groups,
                                           config if isinstance(config, dict) else {})
    return result


def _base_model(model):
    # A PeftModel built before kt_patch was enabled: the stock model is under it (its experts then carry PEFT
    # wrappers, which the patcher leaves alone with a log line).
    return model


def _fp16_enabled(config) -> bool:
    return isinstance(config, dict) and bool((config.get("fp16") or {}).get("enabled", False) is True)


def _refuse_unsupported(model, config, engine) -> None:
    zero = config.get("zero_optimization") or {}
    offload = zero.get("offload_param") or {}
    if isinstance(offload, dict) and str(offload.get("device", "none")).lower() not in ("none", "", "null"):
        raise OptionError("kt_patch: ZeRO-Infinity parameter offload (zero_optimization.offload_param) is not "
                          "supported with routed experts in the CPU kernel: they already live in host memory, in "
                          "the kernel; remove offload_param (offload_optimizer is fine)")
    if type(engine).__name__ == "PipelineEngine" or type(model).__name__ == "PipelineModule" or (
            isinstance(config.get("pipeline"), dict) and config["pipeline"].get("stages", 1) not in (1, "auto")):
        raise OptionError("kt_patch: DeepSpeed pipeline parallelism is not supported with routed experts in the CPU "
                          "kernel")


def _take_out_of_optimizer(arguments, trainable):
    """Remove the trainable expert parameters from the client optimizer's groups (or from ``model_parameters``);
    returns (the client optimizer or None, [(group index in DeepSpeed's optimizer or None, hyper-parameters at
    start, [params])])."""
    optimizer = arguments.get("optimizer")
    if not trainable:
        return optimizer, []
    if isinstance(optimizer, torch.optim.Optimizer) and type(optimizer).__name__ != "DummyOptim":
        group_list = optimizer.param_groups
    else:
        params = arguments.get("model_parameters")
        if params is None:
            params = [p for p in arguments["model"].parameters() if p.requires_grad]
        params = list(params)
        if params and not isinstance(params[0], dict):
            params = [{"params": params}]
        arguments["model_parameters"] = params
        group_list = params
        if type(optimizer).__name__ == "DummyOptim":  # accelerate's stand-in for a DeepSpeed-config optimizer
            optimizer.param_groups = params
    taken, kept_index = [], 0
    for group in list(group_list):
        group["params"] = list(group["params"])
        mine = [p for p in group["params"] if id(p) in trainable]
        if mine:
            group["params"] = [p for p in group["params"] if id(p) not in trainable]
        hyper = {k: v for k, v in group.items() if k != "params"}
        if group["params"]:
            index = kept_index
            kept_index += 1
        else:
            group_list.remove(group)
            index = None
            if mine:
                logger.warning("kt_patch: an optimizer group holds only routed-expert LoRA parameters; its "
                               "learning rate is taken as it is now (a scheduler does not reach it)")
        if mine:
            taken.append((index, hyper, mine))
    seen = {id(p) for _, _, mine in taken for p in mine}
    missing = [p for key, (_, p) in trainable.items() if key not in seen]
    if missing:  # trainable but in no group: DeepSpeed would not have trained them either
        for _, param in trainable.items():
            if id(param) not in seen:
                param.requires_grad_(False)
    return optimizer, taken


class _ExpertLora:
    """The trainable routed-expert parameters of one engine, outside DeepSpeed: broadcast once from the first
    data-parallel rank, gradients averaged at each optimizer step, stepped by a companion optimizer."""

    def __init__(self, engine, layers, trainable, client_optimizer, groups, config):
        self.layers = layers
        self.params = [param for _, param in trainable.values()]
        self.names = {id(param): name for name, param in trainable.values()}
        self.groups = groups
        self.group, self.world = None, 1
        self.clip_coefficient = 1.0
        if self.params and dist.is_available() and dist.is_initialized():
            dp_group = getattr(engine, "seq_data_parallel_group", None) or getattr(engine, "data_parallel_group",
                                                                                     None) or dist.group.WORLD
            self.group = peers.gloo_group(dp_group)
            peers.activate()
            self.world = dist.get_world_size(self.group)
            source = dist.get_global_rank(self.group, 0)
            for param in self.params:
                dist.broadcast(param.data, src=source, group=self.group)
        self.optimizer = _companion(client_optimizer, groups, config) if self.params else None
        if self.params and hasattr(engine.optimizer, "unscale_and_clip_grads") and engine.gradient_clipping() > 0:
            self._clip_with(engine.optimizer, engine.gradient_clipping())

    def reduce(self) -> None:
        if self.group is None or self.world == 1:
            return
        has = torch.tensor([param.grad is not None for param in self.params], dtype=torch.int32)
        peers.check(force=True)  # a rank that failed issues none of these
        peers.wait(dist.all_reduce(has, group=self.group, async_op=True), "which expert-LoRA gradients exist")
        grads = []
        for param, anywhere in zip(self.params, has.tolist()):
            if anywhere:
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                grads.append(param.grad)
        if grads:
            flat = torch._utils._flatten_dense_tensors(grads)
            peers.wait(dist.all_reduce(flat, group=self.group, async_op=True), "the expert-LoRA gradient average")
            flat.div_(self.world)
            for grad, averaged in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                grad.copy_(averaged)

    def squared_norm(self) -> float:
        return float(sum((param.grad.double() ** 2).sum() for param in self.params if param.grad is not None))

    def _clip_with(self, ds_optimizer, max_norm) -> None:
        """ZeRO 1/2/3 clip their gradients by the global norm in ``unscale_and_clip_grads(..., total_norm)``: give
        it the norm of theirs and ours together, and clip ours by the same coefficient."""
        original = ds_optimizer.unscale_and_clip_grads
        state = self

        def unscale_and_clip_grads(*args, **kwargs):
            args = list(args)
            total = args[-1] if "total_norm" not in kwargs else kwargs["total_norm"]
            scale = float(getattr(ds_optimizer, "loss_scale", 1.0) or 1.0)
            ours = state.squared_norm()
            combined = (float(total) ** 2 + ours * scale * scale) ** 0.5
            if torch.is_tensor(total):
                combined = torch.tensor(combined, dtype=total.dtype, device=total.device)
            state.clip_coefficient = max(1.0, ((float(combined) / scale) + 1e-6) / max_norm)
            if "total_norm" in kwargs:
                kwargs["total_norm"] = combined
            else:
                args[-1] = combined
            return original(*args, **kwargs)

        ds_optimizer.unscale_and_clip_grads = unscale_and_clip_grads

    def state_dict(self) -> dict:
        """What a DeepSpeed checkpoint carries for the expert LoRA: the values and the companion optimizer's state."""
        return {"params": {self.names[id(param)]: param.detach().cpu().clone() for param in self.params},
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None}

    def load_state_dict(self, state, optimizer=True) -> None:
        values = state.get("params") or {}
        missing = [self.names[id(param)] for param in self.params if self.names[id(param)] not in values]
        if missing:
            raise RuntimeError(f"kt_patch: the checkpoint holds no value for routed-expert LoRA parameter(s) "
                               f"{missing[:4]}{'...' if len(missing) > 4 else ''} (saved from another model?)")
        with torch.no_grad():
            for param in self.params:
                param.copy_(values[self.names[id(param)]])
        if optimizer and self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])

    def step(self, live) -> None:
        """One step of the companion optimizer with the hyper-parameters DeepSpeed's groups had for this step."""
        if self.optimizer is None:
            return
        for (index, hyper, _), group in zip(self.groups, self.optimizer.param_groups):
            source = live[index] if index is not None and index < len(live) else hyper
            for key, value in source.items():
                if key != "params" and key in group:
                    group[key] = value
        if self.clip_coefficient != 1.0:
            for param in self.params:
                if param.grad is not None:
                    param.grad.div_(self.clip_coefficient)
        self.optimizer.step()
        self.clip_coefficient = 1.0
        for param in self.params:
            param.grad = None


def _companion(client_optimizer, groups, config):
    param_groups = [dict(hyper, params=params) for _, hyper, params in groups]
    if isinstance(client_optimizer, torch.optim.Optimizer) and type(client_optimizer).__name__ != "DummyOptim":
        cls, defaults = type(client_optimizer), dict(client_optimizer.defaults)
    else:
        section = config.get("optimizer") or {}
        kind = str(section.get("type", "")).lower()
        settings = dict(section.get("params") or {})
        if kind not in ("adam", "adamw", "fusedadam", "cpuadam", "deepspeedcpuadam"):
            raise OptionError(f"kt_patch: LoRA on routed experts is stepped outside DeepSpeed by a torch optimizer; "
                              f"DeepSpeed optimizer type {section.get('type')!r} has no torch counterpart here "
                              "(use Adam/AdamW, or pass a torch optimizer to deepspeed.initialize)")
        decoupled = kind == "adamw" or settings.pop("adam_w_mode", True)
        cls = torch.optim.AdamW if decoupled else torch.optim.Adam
        known = ("lr", "betas", "eps", "weight_decay", "amsgrad")
        defaults = {k: v for k, v in settings.items() if k in known and v != "auto"}
        for group in param_groups:
            for key in list(group):
                if key != "params" and (key not in known or group[key] == "auto"):
                    del group[key]
            for key, value in defaults.items():
                group.setdefault(key, value)
    try:
        return cls(param_groups, **{k: v for k, v in defaults.items() if k not in ("differentiable",)})
    except TypeError:
        return cls(param_groups)


def _take_model_step(original, engine, args, kwargs):
    state = getattr(engine, "_kt_patch_experts", None)
    if state is None:
        return original(engine, *args, **kwargs)
    state.reduce()  # averaged before DeepSpeed's step, so stage 0's clip_fp32_gradients sees the averaged values
    live = [dict(group) for group in getattr(engine.optimizer, "param_groups", None) or []]  # before its scheduler
    grads = [param.grad for param in state.params]  # stage 0's zero_grad walks the module's parameters: ours too
    ours = state.squared_norm()
    result = original(engine, *args, **kwargs)
    norm = getattr(engine, "_global_grad_norm", None)  # get_global_grad_norm(), which HF Trainer logs
    if ours and engine.zero_optimization() and norm is not None and math.isfinite(float(norm)):
        # ZeRO 1/2/3 computed it over their own gradients; the global norm includes the expert LoRA's (stage 0
        # keeps none: its clip already walks the module's parameters, ours among them)
        engine._global_grad_norm = (norm.double() ** 2 + ours).sqrt().to(norm.dtype) if torch.is_tensor(norm) else (
            float(norm) ** 2 + ours) ** 0.5
    for param, grad in zip(state.params, grads):
        param.grad = grad
    state.step(live)
    return result


_CHECKPOINT_KEY = "kt_patch_expert_lora"


def _save_checkpoint(original, engine, args, kwargs):
    """``engine.save_checkpoint``: DeepSpeed saves the model with the routed-experts modules detached (their frozen
    weights live in the kernel and come from the base model; ZeRO 2/3 would also record the placeholders as frozen
    parameters), and the expert LoRA's values and companion optimizer state go in under their own key of the client
    state, which every rank passes alike (they are the same on every rank)."""
    state = getattr(engine, "_kt_patch_experts", None)
    if state is None:
        return original(engine, *args, **kwargs)
    bound = inspect.signature(original).bind(engine, *args, **kwargs)
    client_state = dict(bound.arguments.get("client_state") or {})
    if _CHECKPOINT_KEY in client_state:
        raise KeyError(f"client_state key {_CHECKPOINT_KEY!r} is kt_patch's")
    client_state[_CHECKPOINT_KEY] = state.state_dict()
    bound.arguments["client_state"] = client_state
    with _detached(state.layers):
        return original(*bound.args, **bound.kwargs)


def _load_checkpoint(original, engine, args, kwargs):
    """``engine.load_checkpoint``: the model part loads with the routed-experts modules detached (as it was saved);
    the expert LoRA's values come back, and its companion optimizer's state unless the optimizer states are not
    loaded (``load_optimizer_states=False`` or ``load_module_only=True``)."""
    state = getattr(engine, "_kt_patch_experts", None)
    if state is None:
        return original(engine, *args, **kwargs)
    bound = inspect.signature(original).bind(engine, *args, **kwargs)
    bound.apply_defaults()
    with _detached(state.layers):
        result = original(*bound.args, **bound.kwargs)
    load_path, client_state = result
    if load_path is None:  # nothing found; DeepSpeed warned
        return result
    saved = client_state.pop(_CHECKPOINT_KEY, None) if isinstance(client_state, dict) else None
    if saved is None:
        if state.params:
            raise RuntimeError(f"kt_patch: checkpoint {load_path} was not saved from a patched model with LoRA on "
                               "routed experts (no expert-LoRA state in it)")
        return result
    arguments = bound.arguments
    state.load_state_dict(saved, optimizer=arguments.get("load_optimizer_states", True)
                          and not arguments.get("load_module_only", False))
    return result


def _zero3_state_dict(original, engine, args, kwargs):
    state = getattr(engine, "_kt_patch_experts", None)
    if state is None:
        return original(engine, *args, **kwargs)
    with _detached(state.layers):
        result = original(engine, *args, **kwargs)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if result is not None and rank0:
        # the expert-LoRA parameters under their names relative to the engine's module (as the state dict holds)
        for layer_name, layer in engine.module.named_modules():
            if isinstance(layer, KtMoeLayer):
                prefix = ".".join(filter(None, (layer_name, layer.family.experts)))
                for name, param in layer._modules[layer.family.experts].named_parameters(prefix=prefix):
                    if param.requires_grad:
                        result[name] = param.detach().cpu().clone()
    return result
