"""Where each routed expert of a MoE layer runs: on the accelerator (resident or streamed) or in the CPU kernel.

Per layer and per call a :class:`TierPlan` puts every expert on one tier. The CPU kernel is submitted first with the
accelerator's slots marked as skipped (expert id -1); the accelerator computes its experts meanwhile; the outputs are
summed. Gradients (dx, routing weights, the expert-LoRA factors) mean the same on both tiers: the accelerator's are
added to the kernel's in the same fp32 buffers, which autograd adds into the PEFT parameters' ``.grad``.

Weights on the accelerator are either *resident* (unpacked onto the device once, within the ``gpu_expert_budget``)
or *streamed*: the rows of the kernel's own packed buffers (:meth:`ExpertKernel.packed_weights`, registered as pinned
memory in place, so host memory does not grow) are copied on a side stream while the CPU kernel runs, unpacked on the
device and freed after use. A plain forward keeps nothing for its backward, which fetches the weights again and
recomputes the accelerator's experts under autograd, so a streamed layer holds no device memory between its forward
and its backward; a checkpointed layer's recompute, whose backward follows at once, records its computation for it.
The LoRA factors are copied to the device once per optimizer step (their version changes with each update).

The plan is a pure function of the call's routing and of rates frozen for the step, so a checkpointed layer's first
forward and its recompute agree on it: a forced ``accelerator_fraction`` puts the experts with the most tokens on the
accelerator; otherwise the split is the one that balances the two sides' estimated times (CPU seconds per row,
accelerator seconds per row, link seconds per streamed expert), measured on every call and frozen when a layer starts
a forward that is not a recompute.
"""
from __future__ import annotations

import dataclasses
import logging
import time
import weakref

import torch
import torch.nn.functional as F

from .kernel import ExpertKernel, ExpertLora, _gate_then_up

logger = logging.getLogger("kt_patch")
_MATRICES = ("gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class TierPlan:
    """One layer's split for one call: ``on_accelerator`` [E] bool (on the routing's device)."""

    on_accelerator: torch.Tensor

    def cpu_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """The routing the CPU kernel gets: the accelerator's slots as -1 (skipped)."""
        return ids.masked_fill(self.on_accelerator[ids], -1)

    @property
    def any(self) -> bool:
        return bool(self.on_accelerator.any())


class GpuExpertBudget:
    """Bytes of accelerator memory that resident experts may take, shared by the layers of a process."""

    def __init__(self, budget_gib):
        self.budget_gib = budget_gib
        self.left: int | None = None

    def take(self, resident_bytes: int, stream_bytes: int, device: torch.device) -> bool:
        """Reserve ``resident_bytes`` for one layer's resident experts if the budget, less the stream buffers of one
        layer (``stream_bytes``), allows it; False: that layer streams."""
        if self.left is None:
            if self.budget_gib == "auto":
                free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
                self.left = int(free * 0.5)  # the other half for activations, optimizer state and LoRA
            else:
                self.left = int(float(self.budget_gib) * 2**30)
                if self.left < stream_bytes:
                    raise ValueError(f"kt_patch option 'gpu_expert_budget' ({self.budget_gib} GiB) is below one "
                                     f"layer's stream buffers ({stream_bytes / 2**30:.3f} GiB); give at least that, "
                                     "'auto', or executor='cpu'")
        if resident_bytes > self.left - stream_bytes:
            return False
        self.left -= resident_bytes
        return True


def _pin_in_place(kernel: ExpertKernel, tensors) -> None:
    """Register the kernel's packed buffers as pinned memory (async copies, no second host copy), once per kernel;
    unregistered when the kernel goes, so that memory reused at the same address can be registered again."""
    if getattr(kernel, "_pinned", False):
        return
    cudart = torch.cuda.cudart()
    addresses = []
    flags = 8 if kernel.weights_read_only else 0  # cudaHostRegisterReadOnly: another rank's segment, mapped read-only
    for tensor in tensors:
        cudart.cudaHostRegister(tensor.data_ptr(), tensor.numel() * tensor.element_size(), flags)
        addresses.append(tensor.data_ptr())
    kernel._pinned = True
    weakref.finalize(kernel, lambda: [cudart.cudaHostUnregister(address) for address in addresses])


def _keep_tensor(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


_GROUPED_MM_WORKS: dict = {}


def _grouped_mm(rows: torch.Tensor, matrices: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """``rows[ends[g-1]:ends[g]] @ matrices[g]`` for every group g, stacked: torch's grouped GEMM where it takes these
    operands (its kernels want 16-byte aligned strides, and a dtype the device implements), else a loop."""
    key = (rows.device.type, rows.dtype, rows.shape[1], matrices.shape[2])
    aligned = all(dim * rows.element_size() % 16 == 0 for dim in key[2:])  # also the backward's operands
    if aligned and _GROUPED_MM_WORKS.get(key, True) and hasattr(torch, "_grouped_mm"):
        try:
            out = torch._grouped_mm(rows, matrices, offs=ends)
            _GROUPED_MM_WORKS[key] = True
            return out
        except RuntimeError:
            _GROUPED_MM_WORKS[key] = False
    bounds = [0, *ends.tolist()]
    parts = [rows[bounds[g]:bounds[g + 1]] @ matrices[g] for g in range(matrices.shape[0])]
    return torch.cat(parts) if parts else rows.new_zeros(0, matrices.shape[2])


class _Rates:
    """Exponential averages of measured seconds: per CPU row, per accelerator row, per streamed expert."""

    def __init__(self):
        self.cpu_row = self.accelerator_row = self.stream_expert = None

    def update(self, name: str, value: float) -> None:
        old = getattr(self, name)
        setattr(self, name, value if old is None else 0.7 * old + 0.3 * value)

    def frozen(self) -> tuple:
        return self.cpu_row, self.accelerator_row, self.stream_expert


class AcceleratorTier:
    """The accelerator's share of one MoE layer's routed experts, on ``device`` (a CPU device runs the same torch code:
    how the split is tested without a GPU)."""

    def __init__(self, kernel: ExpertKernel, device: torch.device, *, executor: str, budget: GpuExpertBudget,
                 accelerator_fraction: float | None, gate_up_bias=None, down_bias=None):
        self.kernel, self.device, self.executor = kernel, device, executor
        self.fraction = accelerator_fraction
        self.spec = kernel.spec
        self.packed = kernel.packed_weights()
        expert_bytes = sum(t[0].numel() * t.element_size() for t in self.packed.values())
        self.resident = None
        layer_bytes = expert_bytes * kernel.num_experts
        # a streamed layer holds its packed rows and their unpacked copy at once
        if budget.take(layer_bytes, 2 * layer_bytes, device):
            self.resident = {name: kernel.unpack(self.packed[name].to(device), name) for name in _MATRICES}
        elif device.type == "cuda":
            _pin_in_place(kernel, self.packed.values())
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" and self.resident is None else None
        gu_bias = None if gate_up_bias is None else gate_up_bias.detach().float()
        gu_bias = _gate_then_up(gu_bias, 1) if gu_bias is not None and self.spec.interleaved else gu_bias
        self.biases = (None if gu_bias is None else gu_bias.to(device),
                       None if down_bias is None else down_bias.detach().float().to(device))
        self.rates = _Rates()
        self._frozen_rates = (None, None, None)
        self._pending_event = None
        self._recorded = None  # a recompute's forward under autograd, for the backward that follows it
        self._factors = None  # (versions of the LoRA factors, their device copies)

    @property
    def tier_name(self) -> str:
        return "resident" if self.resident is not None else "streamed"

    # ------------------------------------------------------------------------------------------------ plan
    def plan(self, ids: torch.Tensor, refresh_rates: bool) -> TierPlan:
        E = self.kernel.num_experts
        self._collect_accelerator_time()
        if refresh_rates:
            self._frozen_rates = self.rates.frozen()
        if self.executor == "accelerator":
            return TierPlan(torch.ones(E, dtype=torch.bool, device=ids.device))
        counts = torch.bincount(ids.flatten(), minlength=E)
        order = torch.sort(counts, descending=True, stable=True).indices
        if self.fraction is not None:
            chosen = round(self.fraction * E)
        else:
            chosen = self._balanced_count(counts[order].cpu())
        on = torch.zeros(E, dtype=torch.bool, device=ids.device)
        on[order[:chosen]] = True
        return TierPlan(on)

    def _balanced_count(self, sorted_counts: torch.Tensor) -> int:
        """How many of the busiest experts go to the accelerator so that both sides finish together."""
        cpu_row, accelerator_row, stream_expert = self._frozen_rates
        if cpu_row is None or accelerator_row is None:
            return (sorted_counts.numel() + 1) // 2  # no measurement yet: half, to measure both sides
        rows = torch.cat((torch.zeros(1), torch.cumsum(sorted_counts.double(), 0)))
        n = torch.arange(rows.numel(), dtype=torch.float64)
        link = (stream_expert or 0.0) * n if self.resident is None else 0.0
        cost = torch.maximum((rows[-1] - rows) * cpu_row, rows * accelerator_row + link)
        return int(torch.argmin(cost))

    def record_cpu_time(self, seconds: float, rows: int) -> None:
        if rows:
            self.rates.update("cpu_row", seconds / rows)

    def _collect_accelerator_time(self) -> None:
        if self._pending_event is None:
            return
        start, end, rows, streamed = self._pending_event
        if isinstance(start, float):
            seconds = end - start
        elif end.query():
            seconds = start.elapsed_time(end) / 1e3
        else:
            return
        self._pending_event = None
        if rows:
            self.rates.update("accelerator_row", seconds / rows)
        if streamed:
            self.rates.update("stream_expert", seconds / streamed / 4)  # the link's share, roughly

    # ------------------------------------------------------------------------------------------------ compute
    def _weights(self, experts: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.resident is not None:
            return {name: self.resident[name][experts.to(self.device)] for name in _MATRICES}
        host_experts = experts.tolist()
        if self.copy_stream is None:
            return {name: self.kernel.unpack(self.packed[name][experts.cpu()].to(self.device), name)
                    for name in _MATRICES}
        packed = {}
        whole = 2 * len(host_experts) > self.kernel.num_experts  # one copy of the layer beats many small ones
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            for name in _MATRICES:
                src = self.packed[name]
                if whole:
                    packed[name] = src.to(self.device, non_blocking=True)
                    continue
                dst = torch.empty((len(host_experts), src.shape[1]), dtype=src.dtype, device=self.device)
                for i, e in enumerate(host_experts):
                    dst[i].copy_(src[e], non_blocking=True)
                packed[name] = dst
        torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
        for dst in packed.values():
            dst.record_stream(torch.cuda.current_stream(self.device))
        if whole:
            packed = {name: rows[experts.to(self.device)] for name, rows in packed.items()}
        return {name: self.kernel.unpack(packed[name], name) for name in _MATRICES}

    def _device_factors(self, lora: ExpertLora) -> dict[str, torch.Tensor]:
        """fp32 device copies of the factors, expert-major: A [E, r, in], B [E, out, r] (gate rows first). Copied
        again only when a factor changed (an optimizer step bumps its version), so a step's forward, recompute and
        backward share one copy."""
        key = tuple((id(t), t._version) for _, f in lora.items() for t in (f.A, f.B))
        if self._factors is not None and self._factors[0] == key:
            return self._factors[1]
        E, out = self.kernel.num_experts, {}
        for which, factors in lora.items():
            rank = factors.A.shape[0] // E
            A = factors.A.detach().to(self.device, torch.float32, non_blocking=True).view(E, rank, -1)
            B = factors.B.detach().to(self.device, torch.float32, non_blocking=True)
            B = B.view(B.shape[0], rank, E).permute(2, 0, 1)
            out[f"{which}_A"] = A
            out[f"{which}_B"] = _gate_then_up(B, 1) if which == "gate_up" and self.spec.interleaved else B
        self._factors = (key, out)
        return out

    def _lora_slices(self, lora: ExpertLora, experts: torch.Tensor) -> dict[str, torch.Tensor]:
        """The accelerator experts' rows of :meth:`_device_factors` (new tensors: leaves for the backward)."""
        index = experts.to(self.device)
        return {key: factors[index] for key, factors in self._device_factors(lora).items()}

    def _run(self, x, ids, w, plan: TierPlan, experts, weights, lora_slices, scalings) -> torch.Tensor:
        """``sum_j w[t,j] expert(x[t])`` over the accelerator's slots, differentiable in x, w and the LoRA slices.

        The slots are grouped by expert and every product is one grouped GEMM over the groups."""
        T, H = x.shape
        position = torch.full_like(plan.on_accelerator, -1, dtype=torch.long)
        position[experts] = torch.arange(experts.numel(), device=position.device)
        slot_position = position[ids]
        tokens, slots = torch.nonzero(slot_position >= 0, as_tuple=True)
        group = slot_position[tokens, slots]
        order = torch.argsort(group, stable=True)
        tokens, slots, group = tokens[order], slots[order], group[order]
        ends = torch.cumsum(torch.bincount(group, minlength=experts.numel()), 0).to(torch.int32)
        rows = x[tokens]
        gate_bias, down_bias = self.biases
        dtype = rows.dtype
        gate = _grouped_mm(rows, weights["gate"].transpose(1, 2), ends)
        up = _grouped_mm(rows, weights["up"].transpose(1, 2), ends)
        if "gate_up_A" in lora_slices:
            low = _grouped_mm(rows, lora_slices["gate_up_A"].to(dtype).transpose(1, 2), ends)
            low = _grouped_mm(low, lora_slices["gate_up_B"].to(dtype).transpose(1, 2), ends) * scalings["gate_up"]
            gate, up = gate + low[:, :gate.shape[1]], up + low[:, gate.shape[1]:]
        if gate_bias is not None:
            row_bias = gate_bias[experts[group]].to(dtype)
            gate, up = gate + row_bias[:, :gate.shape[1]], up + row_bias[:, gate.shape[1]:]
        z = self._activate(gate, up)
        down = _grouped_mm(z, weights["down"].transpose(1, 2), ends)
        if "down_A" in lora_slices:
            low = _grouped_mm(z, lora_slices["down_A"].to(dtype).transpose(1, 2), ends)
            down = down + _grouped_mm(low, lora_slices["down_B"].to(dtype).transpose(1, 2), ends) * scalings["down"]
        if down_bias is not None:
            down = down + down_bias[experts[group]].to(dtype)
        weighted = down.float() * w[tokens, slots].float().unsqueeze(1)
        return torch.zeros(T, H, dtype=torch.float32, device=x.device).index_add(0, tokens, weighted)

    def _activate(self, gate, up):
        spec = self.spec
        if spec.activation == "swiglu":
            return F.silu(gate) * up
        gate = gate.clamp(max=spec.limit)
        up = up.clamp(-spec.limit, spec.limit)
        return (up + 1) * gate * torch.sigmoid(spec.alpha * gate)

    def forward(self, x, ids, w, lora: ExpertLora, plan: TierPlan, for_backward: bool = False) -> torch.Tensor:
        """The accelerator's share of y (fp32, on the device). ``for_backward``: the backward comes next (a
        checkpointed layer's recompute), so the computation is recorded for it instead of being redone there."""
        experts = torch.nonzero(plan.on_accelerator).flatten()
        cuda = self.device.type == "cuda"
        start = torch.cuda.Event(enable_timing=True) if cuda else time.perf_counter()
        if cuda:
            start.record()
        self._recorded = None
        try:
            if for_backward:
                self._recorded = self._record(x, ids, w, lora, plan, experts)
                y = self._recorded[-1].detach()
            else:
                with torch.no_grad():
                    y = self._run(x.to(self.device), ids.to(self.device), w.to(self.device), plan, experts,
                                  self._weights(experts), self._lora_slices(lora, experts),
                                  {which: f.scaling for which, f in lora.items()})
        except torch.OutOfMemoryError:
            self._recorded = None
            self._warn_out_of_memory("forward")
            return self._on_cpu(x, ids, w, lora, plan)[0]
        if cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
        else:
            end = time.perf_counter()
        rows = int((plan.on_accelerator[ids]).sum())
        self._pending_event = (start, end, rows, 0 if self.resident is not None else experts.numel())
        return y

    def _warn_out_of_memory(self, where: str) -> None:
        logger.warning("kt_patch: %s: out of accelerator memory in the %s; the CPU kernel computes this call's "
                       "accelerator experts instead", self.kernel.name, where)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _on_cpu(self, x, ids, w, lora: ExpertLora, plan: TierPlan, dy=None):
        """The accelerator's slots computed by the CPU kernel instead (out of accelerator memory): ``(y, dx, dw,
        add_lora_grads)`` on the device, the last three with ``dy``."""
        x_cpu = self.kernel.host_tokens(x)
        own_ids = ids.masked_fill(~plan.on_accelerator[ids], -1).cpu()
        y, ctx = self.kernel.forward(x_cpu, own_ids, w, lora, save_for_backward=dy is not None)
        y = y.to(self.device, torch.float32)
        if dy is None:
            return y, None, None, None
        lora_parts = ctx.new_lora_grads()
        dx, dw = self.kernel.backward(ctx, dy.detach().to("cpu", x_cpu.dtype).contiguous(), lora_parts)

        def add_lora_grads(lora_grads: dict) -> None:
            for key, grad in lora_parts.items():
                lora_grads[key] += grad

        return y, dx.to(self.device), dw.to(self.device), add_lora_grads

    def _record(self, x, ids, w, lora, plan, experts):
        """The accelerator's forward under autograd, from leaves: ``(experts, x, w, LoRA slices, y)``."""
        x_leaf = x.detach().to(self.device).requires_grad_(True)
        w_leaf = w.detach().to(self.device).requires_grad_(True)
        slices = {key: t.requires_grad_(True) for key, t in self._lora_slices(lora, experts).items()}
        # A graph of its own, kept by this tier: a checkpoint's saved-tensors hooks (active in a recompute) must not
        # take its tensors, which the first forward never saved.
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_keep_tensor, _keep_tensor):
            y = self._run(x_leaf, ids.to(self.device), w_leaf, plan, experts, self._weights(experts), slices,
                          {which: f.scaling for which, f in lora.items()})
        return experts, x_leaf, w_leaf, slices, y

    def backward(self, x, ids, w, lora: ExpertLora, plan: TierPlan, dy):
        """dx and dw of the accelerator's slots, and a function that adds their LoRA gradients into fp32 host buffers
        (PEFT layout; called once the CPU kernel has written them). The weights are fetched again and the forward
        recomputed under autograd."""
        experts = torch.nonzero(plan.on_accelerator).flatten()
        recorded, self._recorded = self._recorded, None
        try:
            if recorded is None or recorded[1].shape != x.shape or not torch.equal(recorded[0], experts):
                recorded = self._record(x, ids, w, lora, plan, experts)
            _, x_leaf, w_leaf, slices, y = recorded
            with torch.enable_grad():
                grads = torch.autograd.grad(y, [x_leaf, w_leaf, *slices.values()],
                                            dy.to(self.device, torch.float32), allow_unused=True)
        except torch.OutOfMemoryError:
            del recorded
            self._warn_out_of_memory("backward")
            return self._on_cpu(x, ids, w, lora, plan, dy)[1:]
        dx = torch.zeros_like(x_leaf) if grads[0] is None else grads[0]
        dw = torch.zeros_like(w_leaf) if grads[1] is None else grads[1]
        lora_parts = {key: grad.to("cpu", torch.float32) for key, grad in zip(slices, grads[2:]) if grad is not None}

        def add_lora_grads(lora_grads: dict) -> None:
            E, host = self.kernel.num_experts, experts.cpu()
            for key, grad in lora_parts.items():
                target = lora_grads[key]
                if key.endswith("_A"):
                    target.view(E, grad.shape[1], -1)[host] += grad
                    continue
                if key == "gate_up_B" and self.spec.interleaved:  # back to PEFT's alternating gate, up rows
                    half = grad.shape[1] // 2
                    grad = torch.stack((grad[:, :half], grad[:, half:]), dim=2).reshape(grad.shape)
                target.view(target.shape[0], grad.shape[2], E)[:, :, host] += grad.permute(1, 2, 0)

        return dx, dw, add_lora_grads
