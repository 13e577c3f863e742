"""The kt_patch MoE layer: a sparse-MoE block whose routed experts run in the CPU kernel.

It adopts the stock block's children (router, experts, shared experts) under their original names and in their
original order, so parameter names, ``named_modules()`` order, checkpoint keys and PEFT targeting are unchanged. The
router is called as a module; routed experts are computed by the kernel from the weights it owns (and from PEFT
expert-LoRA factors, when PEFT wrapped the experts); shared experts and LoRA Experts stay ordinary torch modules on
the accelerator.
"""
from __future__ import annotations

import contextlib
import logging
import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

from .autograd import expert_forward
from .executor import AcceleratorTier, GpuExpertBudget, SharedRates
from .expert_lora import active_expert_lora, lora_factor_modules, unwrapped_experts
from .kernel import NO_LORA, ExpertKernel, ExpertLora
from .options import CHECKPOINT_POLICIES
from .registry import EXPERT_WEIGHTS, MoeFamily

_export = threading.local()
logger = logging.getLogger("kt_patch")
# device types the accelerator tiers run on; the CPU device runs the same torch code (how the tiers are tested)
_TIER_DEVICE_TYPES = ("cuda",)
_hinted_factors_on_host = threading.Event()  # the hint is logged once per process


@contextlib.contextmanager
def skip_expert_export():
    """Within this block, state dicts keep the placeholders instead of reading expert weights back from kernels."""
    previous = getattr(_export, "skip", False)
    _export.skip = True
    try:
        yield
    finally:
        _export.skip = previous


def weight_placeholder(weight: torch.Tensor) -> nn.Parameter:
    """A frozen CPU parameter with the weight's shape and dtype but one element of storage.

    PEFT reads the shape (and dtype, device) of expert parameters to size and place its LoRA factors, and parameter
    counts stay right; the values live in the kernel and are read back only for a state dict.
    """
    return nn.Parameter(torch.zeros((), dtype=weight.dtype, device="cpu").expand(weight.shape), requires_grad=False)


def is_placeholder(tensor: torch.Tensor) -> bool:
    return tensor.dim() > 0 and all(stride == 0 for stride in tensor.stride())


_side_streams: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device):
    """One extra CUDA stream per device for the dense experts; None off CUDA."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _side_streams:
        _side_streams[index] = torch.cuda.Stream(index)
    return _side_streams[index]


# The name of the LoRA Experts' child module, so also their key in the adapter file. It must not contain PEFT's LoRA
# parameter prefix "lora_": PEFT before 0.21 takes every key containing it for a LoRA factor and, loading the adapter,
# inserts the adapter name after it (".lora_experts.default.modules_to_save.default.gate_up_proj"), so the saved
# weights were never loaded.
LORA_EXPERTS_MODULE = "adapter_experts"


class LoraExperts(nn.Module):
    """Small dense SwiGLU MLPs applied to every token and summed; trainable, saved with the adapter.

    ``down_proj`` starts at zero so that adding them leaves the model's outputs unchanged until they are trained. The
    layer holds them as its ``LORA_EXPERTS_MODULE`` child, which PEFT trains and saves as a ``modules_to_save`` entry.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, device=None):
        super().__init__()
        # fp32 master weights whatever the model's dtype (as PEFT keeps adapters); cast to the activations in forward.
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, device=device))
        self.down_proj = nn.Parameter(torch.zeros(num_experts, hidden_size, intermediate_size, device=device))
        nn.init.normal_(self.gate_up_proj, std=1.0 / math.sqrt(hidden_size))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # LoRA Experts of another count or intermediate size (same hidden size: else they are another model's adapter)
        # would fail in torch's copy naming only the shapes: name the options that set them.
        saved, own = state_dict.get(prefix + "down_proj"), self.down_proj.shape  # [count, hidden, intermediate size]
        if saved is not None and saved.shape != own and saved.shape[1:2] == own[1:2]:
            raise ValueError(f"kt_patch: the LoRA Experts being loaded are {saved.shape[0]} of intermediate size "
                             f"{saved.shape[2]} per layer, this model's {own[0]} of {own[2]}: load the base model with "
                             f"kt_patch enabled with lora_experts={saved.shape[0]}, "
                             f"lora_expert_intermediate_size={saved.shape[2]} (the options they were trained with)")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate, up = torch.einsum("th,eih->eti", hidden_states, self.gate_up_proj.to(hidden_states.dtype)).chunk(2, -1)
        return torch.einsum("eti,ehi->th", F.silu(gate) * up, self.down_proj.to(hidden_states.dtype))


class KtMoeLayer(nn.Module):
    """Replaces one sparse-MoE block; ``forward`` returns what the stock block returns.

    On construction the stock experts' weights are replaced by placeholders (the kernel already holds a copy), which
    frees them; ``release_expert_weights`` puts them back.

    Public attributes:

    * ``checkpoint_policy``: ``"recompute"`` or ``"retain"`` (see :mod:`kt_patch.autograd`), from the
      ``checkpoint_policy`` option the layer was built with; may be changed at any time.
    * ``expert_runs``: how many times this layer's routed experts have run in the CPU kernel (forward passes: plain,
      checkpointed first forward and recompute; a retained output handed to a recompute does not count). Assign 0 to
      restart the count.
    """

    def __init__(self, block: nn.Module, family: MoeFamily, kernel: ExpertKernel, *, checkpoint_policy: str,
                 executor: str = "cpu", gpu_budget: GpuExpertBudget | None = None,
                 shared_rates: SharedRates | None = None, accelerator_fraction: float | None = None,
                 expert_lora_on_host: bool = False, lora_experts: LoraExperts | None = None):
        super().__init__()
        for name, child in block._modules.items():
            self.add_module(name, child)
        # Plain attributes (top_k, jitter_noise, config, ...) that other code may read from the block.
        for name, value in vars(block).items():
            if not name.startswith("_") and name != "training":
                self.__dict__.setdefault(name, value)
        self.training = block.training
        self.family = family
        self.kernel = kernel
        self.checkpoint_policy = checkpoint_policy
        self.executor, self.accelerator_fraction = executor, accelerator_fraction
        # the expert-LoRA factors stay in host memory (else they go with the model, :meth:`_apply`)
        self._expert_lora_on_host = executor == "cpu" or expert_lora_on_host
        self._gpu_budget = gpu_budget or GpuExpertBudget("auto")
        self._shared_rates = shared_rates
        # the layer's place among those sharing the budget (resident layers are spread over them)
        self._budget_position = self._gpu_budget.add(kernel) if executor != "cpu" else None
        self.accelerator: AcceleratorTier | None = None  # made at the first forward, once the device is known
        self.expert_runs = 0
        if lora_experts is not None:
            self.add_module(LORA_EXPERTS_MODULE, lora_experts)
        experts = getattr(block, family.experts)
        for name in EXPERT_WEIGHTS:
            setattr(experts, name, weight_placeholder(getattr(experts, name)))
        self._expert_weight_hooks = route_state_dict_through_kernel(self, experts)

    def release_expert_weights(self) -> None:
        """Undo the take-over: real weights (read back from the kernel) on the stock experts module, hooks removed."""
        for hook in self._expert_weight_hooks:
            hook.remove()
        experts = unwrapped_experts(self._modules[self.family.experts])
        for name, weight in zip(EXPERT_WEIGHTS, self.kernel.export_weights()):
            setattr(experts, name, nn.Parameter(weight, requires_grad=False))

    # torch.compile: the whole MoE block is a graph break (it runs eagerly), since Dynamo cannot trace the kernel's
    # pybind objects, the checkpoint phase it reads, or the side-stream switch; the rest of the model compiles.
    @torch.compiler.disable
    def forward(self, hidden_states: torch.Tensor):
        shape = hidden_states.shape
        if self.family.jitter_noise and self.training and self.jitter_noise > 0:
            # Same draw as the stock block (it scales its input in place); here out of place.
            hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(
                1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        tokens = hidden_states.reshape(-1, shape[-1])
        _, routing_weights, expert_ids = getattr(self, self.family.router)(tokens)

        # The dense experts (shared, LoRA Experts) run on a side stream of the accelerator while the CPU kernel
        # computes the routed experts; the caller's stream waits for them before the sum.
        side = _side_stream(tokens.device)
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(tokens.device))
        with torch.cuda.stream(side):  # no-op for None
            dense = self._dense_experts(tokens)
        lora = self.expert_lora()
        self._check_factor_devices(lora, tokens.device)
        output = expert_forward(self.kernel, tokens, expert_ids, routing_weights, lora,
                                policy=self.checkpoint_policy, on_kernel_run=self._count_expert_run,
                                accelerator=self._accelerator_for(tokens.device), training=self.training)
        if side is not None:
            torch.cuda.current_stream(tokens.device).wait_stream(side)
        if dense is not None:
            output = output + dense
        output = output.reshape(shape)
        return (output, routing_weights) if self.family.returns_router_scores else output

    @property
    def checkpoint_policy(self) -> str:
        return self._checkpoint_policy

    @checkpoint_policy.setter
    def checkpoint_policy(self, policy: str) -> None:
        if policy not in CHECKPOINT_POLICIES:
            raise ValueError(f"checkpoint_policy must be one of {', '.join(CHECKPOINT_POLICIES)}; got {policy!r}")
        self._checkpoint_policy = policy

    def _accelerator_for(self, device: torch.device) -> AcceleratorTier | None:
        """The accelerator tier of this layer on ``device``, or None where the CPU kernel computes every expert
        (executor ``cpu``, or ``auto`` with the model on the CPU or a device the tiers do not run on)."""
        if self.executor == "cpu" or (self.executor == "auto" and device.type not in _TIER_DEVICE_TYPES):
            return None
        # refused here, where the device is first known for sure (inside .to() would leave the model half moved)
        if device.type not in (*_TIER_DEVICE_TYPES, "cpu"):
            raise ValueError(f"kt_patch option 'executor' is {self.executor!r}, but the model is on {device}: the "
                             f"accelerator tiers run on {', '.join(_TIER_DEVICE_TYPES)} devices (and on the CPU "
                             "device, to test them); use executor='auto' or 'cpu' there")
        if self.accelerator is None or self.accelerator.device != device:
            experts = unwrapped_experts(self._modules[self.family.experts])
            biases = dict(zip(("gate_up_bias", "down_bias"),
                              (getattr(experts, name) for name in self.family.expert_biases)))
            self.accelerator = AcceleratorTier(
                self.kernel, device, executor="accelerator" if self.executor == "accelerator" else "hybrid",
                budget=self._gpu_budget, accelerator_fraction=self.accelerator_fraction,
                shared_rates=self._shared_rates, position=self._budget_position, **biases)
            logger.debug("kt_patch: %s: routed experts split per call between %s (%s) and the CPU kernel",
                         self.kernel.name, device, self.accelerator.tier_name)
        return self.accelerator

    def _count_expert_run(self) -> None:
        self.expert_runs += 1

    def load_expert_weights(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                            gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None) -> None:
        """Replace the routed expert weights (and biases, for families that have them), given in the stock module's
        layout: a new kernel built from them with this one's spec."""
        self.kernel = self.kernel.rebuild(gate_up_proj, down_proj, gate_up_bias=gate_up_bias, down_bias=down_bias)
        self.accelerator = None  # its weights and biases were the old kernel's

    def _dense_experts(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """Shared experts (gated where the family gates them) plus LoRA Experts, or None when the block has neither."""
        dense = None
        if self.family.shared_expert is not None:
            dense = getattr(self, self.family.shared_expert)(tokens)
            if self.family.shared_expert_gate is not None:
                dense = torch.sigmoid(getattr(self, self.family.shared_expert_gate)(tokens)) * dense
        if LORA_EXPERTS_MODULE in self._modules:
            lora = self._modules[LORA_EXPERTS_MODULE](tokens)
            dense = lora if dense is None else dense + lora
        return dense

    def expert_lora(self) -> ExpertLora:
        """The active PEFT adapter's factors on the routed experts.

        Looked up on every forward: PEFT may have switched, disabled or re-created adapters since the last step.
        """
        experts = self._modules[self.family.experts]
        return active_expert_lora(experts) if hasattr(experts, "base_layer") else NO_LORA

    def place_expert_lora(self, adapter_name: str) -> None:
        """Move adapter ``adapter_name``'s expert-LoRA factors from host memory to the device of this layer's own
        parameters, where the accelerator tiers compute with them (PEFT makes them beside the experts' weight
        placeholders, and loads them there). Called once PEFT has injected or loaded the adapter: before any optimizer
        holds state for them. Factors not yet made (on the meta device) wait for the adapter's loading; with
        executor='cpu' (or after :meth:`keep_expert_lora_on_host`) they stay in host memory for the kernel."""
        if self._expert_lora_on_host:
            return
        experts = self.family.experts + "."
        device = next((p.device for name, p in self.named_parameters() if not name.startswith(experts)), None)
        if device is None or device.type in ("cpu", "meta"):
            return
        for factors in lora_factor_modules(self._modules[self.family.experts]):
            if adapter_name in factors and all(p.device.type == "cpu" for p in factors[adapter_name].parameters()):
                factors[adapter_name].to(device)

    def _check_factor_devices(self, lora: ExpertLora, device: torch.device) -> None:
        devices = {t.device for t in lora.tensors()}
        on_device_allowed = not self._expert_lora_on_host
        for factor_device in devices:
            if factor_device.type != "cpu" and not (on_device_allowed and factor_device == device):
                raise RuntimeError(
                    f"kt_patch: {self.kernel.name}: expert LoRA factors must be in host memory"
                    + (f" or on the model's device ({device})" if on_device_allowed
                       else " (they are kept there: executor='cpu', expert_lora_placement='host', or an integration"
                            " steps them there)")
                    + f"; something moved them to {factor_device}")
        if on_device_allowed and device.type != "cpu" and torch.device("cpu") in devices \
                and not _hinted_factors_on_host.is_set():
            _hinted_factors_on_host.set()
            logger.warning("kt_patch: the expert-LoRA factors are in host memory while the model is on %s: each step "
                           "copies them to the device and their gradients back, and the optimizer steps them on the "
                           "host; move the model again (model.to(%r)) before making the optimizer to keep them on the "
                           "device", device, str(device))

    def keep_expert_lora_on_host(self) -> None:
        """Keep the expert-LoRA factors in host memory from now on, moved back there if they are on a device: for an
        integration that steps them there itself (DeepSpeed's companion optimizer)."""
        self._expert_lora_on_host = True
        for factors in lora_factor_modules(self._modules[self.family.experts]):
            for adapter in factors.values():  # those not made yet (on the meta device) are left to their loading
                if not any(p.device.type == "meta" for p in adapter.parameters()):
                    adapter.to("cpu")

    def _apply(self, fn, recurse=True):
        # Routed experts (their placeholders, which the kernel stands behind) stay in host memory whatever
        # .to()/.cuda()/.half() or accelerate do with the rest of the model. PEFT's expert-LoRA factors go with the
        # model unless kept on the host: on an accelerator the optimizer then steps them there and the accelerator
        # tiers use them in place, while the CPU kernel reads a host copy made once per step (only when it computes
        # some experts).
        if recurse:
            for name, child in self._modules.items():
                if name != self.family.experts and child is not None:
                    child._apply(fn)
            if not self._expert_lora_on_host:
                for factors in lora_factor_modules(self._modules[self.family.experts]):
                    factors._apply(fn)
        return super()._apply(fn, recurse=False)

    def extra_repr(self) -> str:
        k = self.kernel
        return (f"family={self.family.name}, experts={k.num_experts}, hidden={k.hidden_size}, "
                f"intermediate={k.intermediate_size}, dtype={k.dtype}, isa={k.isa} (routed experts in the CPU kernel)")


def route_state_dict_through_kernel(layer: KtMoeLayer, experts: nn.Module) -> list:
    """State-dict hooks on the stock experts module; returns their handles.

    Saving (``state_dict()``, ``save_pretrained``) reads the weights back from the layer's kernel over the
    placeholders, so a base checkpoint of a patched model loads in stock transformers. Loading a state dict that holds
    expert weights (the placeholders cannot take them) or biases builds a new kernel from them.
    """
    taken = []  # full keys the load pre-hook consumed; not "missing" for load_state_dict

    def save(module, state_dict, prefix, local_metadata):
        names = [prefix + name for name in EXPERT_WEIGHTS]
        if getattr(_export, "skip", False) or not all(n in state_dict and is_placeholder(state_dict[n]) for n in names):
            return
        state_dict[names[0]], state_dict[names[1]] = layer.kernel.export_weights()

    def load(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        names = [prefix + name for name in EXPERT_WEIGHTS]
        bias_names = [prefix + name for name in layer.family.expert_biases]
        if not any(name in state_dict for name in names + bias_names):
            return
        if all(name in state_dict for name in names):
            weights = [state_dict.pop(name) for name in names]
            taken.extend(names)
        else:  # biases alone: the weights stay
            weights = layer.kernel.export_weights()
        # The biases are ordinary parameters of the experts module, which loads them too; the kernel holds a copy.
        biases = [state_dict[name] if name in state_dict else getattr(module, name[len(prefix):])
                  for name in bias_names]
        layer.load_expert_weights(*weights, *biases)

    def report_taken(module, incompatible_keys):
        for name in taken:
            if name in incompatible_keys.missing_keys:
                incompatible_keys.missing_keys.remove(name)
        taken.clear()

    return [experts.register_state_dict_post_hook(save), experts.register_load_state_dict_pre_hook(load),
            experts.register_load_state_dict_post_hook(report_taken)]
