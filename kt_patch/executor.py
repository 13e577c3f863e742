"""Where each routed expert of a MoE layer runs: on the accelerator (resident or streamed) or in the CPU kernel.

Per layer and per step a :class:`TierPlan` puts every expert on one tier. The CPU kernel is submitted first with the
accelerator's slots marked as skipped (expert id -1); the accelerator computes its experts meanwhile; the outputs are
summed. Gradients (dx, routing weights, the expert-LoRA factors) mean the same on both tiers and are summed in fp32,
which autograd adds into the PEFT parameters' ``.grad``. The expert-LoRA factors live with the model (on the
accelerator, where the optimizer steps them, unless something keeps them in host memory): the accelerator uses them in
place, the CPU kernel reads host copies made once per step (:meth:`AcceleratorTier.host_lora`), and its gradients are
added to the accelerator's on the device. Factors kept in host memory reach the accelerator as copies made at each use,
a streamed layer's with its weights.

Weights on the accelerator are either *resident* (unpacked onto the device once, within the ``gpu_expert_budget``; the
resident layers spread over the model's order) or *streamed*: the rows of the kernel's own packed buffers
(:meth:`ExpertKernel.packed_weights`, registered as pinned memory in place, so host memory does not grow) are copied on
a side stream, unpacked where they are used and freed after use. A model's streamed layers on a device are fetched two
ahead of use (:class:`_Prefetcher`): the next layers' during a forward, the previous layers' during a backward, so the
link works while both sides compute; at either end of the order the rows of the pass's last layers stay for the pass
that starts with them again. A plain forward keeps nothing for its backward, which fetches the weights again and
recomputes the accelerator's experts under autograd; a checkpointed layer's recompute, whose backward follows at once,
records its computation for it.

A streamed layer's plan is chosen before the step's routing is known, so that it can be fetched ahead: experts ordered
by the rows they had in the layer's past steps (averaged, recent steps weighing more), each place in that order costed
by the rows that place got in the past steps planned so (routing moves: the busiest experts of the past need not be the
next step's). A resident layer that kept every expert plans ahead too (the host then need not wait for the device to
reach the layer's routing); any layer's first step, and a resident layer whose last split gave the CPU kernel experts,
plans from the routing at hand. Any plan is correct: it only decides who computes what. The busiest experts go to the
accelerator (most rows per byte streamed): a forced ``accelerator_fraction`` of them, or as many as make the layer's
step shortest by the sides' measured times per step (:class:`_Cost`): the CPU's by experts and rows, the accelerator's
by a fixed part and rows, the link's by streamed experts. The two sides of a layer are on its critical path, after the
layer's non-expert part (the next layer waits for their sum), while the link overlaps all of it (a layer is fetched
while the one before it computes), in each pass: a layer's step costs ``max(rest + max(cpu, accelerator), link)`` for
its forward plus the same for its backward (the recompute included), each side's time split between the two passes as
measured, with ``rest`` the layer's non-expert time measured on the device's queue between the expert parts of
consecutive layers (:class:`_Gaps`). A split that calls the CPU kernel also pays what the sides' times do not explain
(:attr:`_Rates.split_overhead`: the host waiting for copies and for the kernel while the device's queue runs dry).
"""
from __future__ import annotations

import dataclasses
import logging
import time
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .kernel import ExpertKernel, ExpertLora, _gate_then_up

logger = logging.getLogger("kt_patch")
_MATRICES = ("gate", "up", "down")
_SIDES = ("cpu", "accelerator", "link", "rest")
# a split that gives the CPU kernel experts must promise this share of the layer's step over the accelerator alone
# (beyond its measured overhead, :attr:`_Rates.split_overhead`): the measurements are noisy
_CPU_SPLIT_GAIN = 0.05
# streamed layers fetched ahead of the one computing (:class:`_Prefetcher`): one hides the link behind the layer
# before it; a second, where the budget holds its buffer, keeps the link busy while the host is held back (a full
# launch queue, while the device waits for the link) from reaching the next layer
_FETCH_DEPTH = 2


def _stream_buffers(depth: int) -> int:
    """Layers' worth of memory streaming takes: the weights in use (unpacked; recorded for a backward) and the
    packed rows of the ``depth`` layers fetched ahead (the first in the buffer the rows in use have just left)."""
    return 1 + depth


@dataclasses.dataclass(frozen=True)
class TierPlan:
    """One layer's split for one step: the sorted ids of the experts the accelerator computes."""

    experts: tuple[int, ...]
    num_experts: int
    # side -> the (units, rows) the planner costed this split by, rows forecast from past routing (None: not chosen by
    # the fits)
    forecast: dict | None = dataclasses.field(default=None, compare=False, repr=False)
    # tensors made once per device (a tensor made from host values waits for the device's queue to empty)
    _on_device: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def mask(self, device: torch.device) -> torch.Tensor:
        """[E] bool on ``device``: True for the accelerator's experts."""
        if ("mask", device) not in self._on_device:
            mask = torch.zeros(self.num_experts, dtype=torch.bool)
            mask[list(self.experts)] = True
            self._on_device["mask", device] = mask.to(device)
        return self._on_device["mask", device]

    def index(self, device: torch.device) -> torch.Tensor:
        """[n] long on ``device``: the accelerator's experts."""
        if ("index", device) not in self._on_device:
            self._on_device["index", device] = torch.tensor(self.experts, dtype=torch.long, device=device)
        return self._on_device["index", device]

    def cpu_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """The routing the CPU kernel gets (on the host): the accelerator's slots as -1 (skipped)."""
        ids = ids.cpu()
        return ids.masked_fill(self.mask(ids.device)[ids], -1)

    @property
    def any(self) -> bool:
        return bool(self.experts)

    @property
    def everything(self) -> bool:
        """The accelerator computes every expert: the CPU kernel has nothing to do."""
        return len(self.experts) == self.num_experts


def layer_bytes(kernel: ExpertKernel) -> int:
    """Bytes of one layer's packed experts (what a resident layer takes on the accelerator)."""
    return sum(t.numel() * t.element_size() for t in kernel.packed_weights().values())


class GpuExpertBudget:
    """Bytes of accelerator memory that resident experts may take, shared by the layers of a process (a patched
    model's), and which of those layers they are."""

    def __init__(self, budget_gib):
        self.budget_gib = budget_gib
        self.left: int | None = None
        self.layers = 0  # layers sharing the budget
        self._resident_layers: int | None = None  # how many layers' experts the budget holds beside the stream buffers
        self._held: dict[int, int] = {}  # bytes taken by the resident layer at each position

    def add(self, kernel: ExpertKernel) -> int:
        """``kernel``'s layer shares this budget, next in the model's order: its stream buffers must fit (checked when
        the model is patched, before any step). Its place in that order."""
        self.check(kernel)
        self.layers += 1
        return self.layers - 1

    def check(self, kernel: ExpertKernel) -> None:
        """A budget given in GiB must hold the stream buffers of ``kernel``'s layer with one layer fetched ahead
        (checked when the model is patched, before any step)."""
        stream_bytes = _stream_buffers(1) * layer_bytes(kernel)
        if self.budget_gib != "auto" and float(self.budget_gib) * 2**30 < stream_bytes:
            raise ValueError(f"kt_patch option 'gpu_expert_budget' ({self.budget_gib} GiB) is below one layer's "
                             f"stream buffers ({stream_bytes / 2**30:.3f} GiB: {_stream_buffers(1)} times the "
                             "layer's experts); give at least that, 'auto', or executor='cpu'")

    def take(self, kernel: ExpertKernel, device: torch.device, position: int | None = None) -> tuple[bool, int]:
        """Whether ``kernel``'s layer, at ``position`` in the model's order (:meth:`add`), is resident: room reserved
        for it if the budget, less the stream buffers, allows it (False: it streams); and how many streamed layers of
        its size are fetched ahead: :data:`_FETCH_DEPTH` where the budget holds their buffers, else one. A layer
        taking again (its tier made anew: weights reloaded, the model moved) first gives back what it held."""
        self.check(kernel)
        if self.left is not None and position is not None:
            self.left += self._held.pop(position, 0)
        resident_bytes = layer_bytes(kernel)
        if self.left is None:
            if self.budget_gib == "auto":
                free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
                self.left = int(free * 0.5)  # the other half for activations, optimizer state and LoRA
            else:
                self.left = int(float(self.budget_gib) * 2**30)
            self._resident_layers = max(0, self.left // resident_bytes - _stream_buffers(_FETCH_DEPTH))
        depth = _FETCH_DEPTH if self.left >= _stream_buffers(_FETCH_DEPTH) * resident_bytes else 1
        # Where not every layer can be resident, the resident ones are spread evenly over the model's order: each
        # computes while the link fetches the streamed layers after it (a run of resident layers at one end of the
        # order would leave the link idle there, with the streamed layers' fetches all on the critical path).
        resident = self._resident_layers
        if position is not None and resident < self.layers and \
                (position + 1) * resident // self.layers == position * resident // self.layers:
            return False, depth
        if resident_bytes > self.left - _stream_buffers(_FETCH_DEPTH) * resident_bytes:
            return False, depth
        self.left -= resident_bytes
        if position is not None:
            self._held[position] = resident_bytes
        return True, depth


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


def _move_to_pinned(parameter: torch.Tensor) -> None:
    """Put a host parameter's values in pinned memory (the optimizer and PEFT keep the same parameter object), so
    that copying it to the accelerator neither blocks the host nor waits for the device's queue to empty."""
    if getattr(parameter, "_kt_pinned_at", None) != parameter.data_ptr():
        with torch.no_grad():
            parameter.data = parameter.data.pin_memory()
        parameter._kt_pinned_at = parameter.data_ptr()


def _keep_tensor(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


_GROUPED_MM_WORKS: dict = {}


def _rows_per_expert(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] long: how often each expert occurs in ``ids``, counted on their device without waiting for it
    (``torch.bincount`` on a GPU reads the ids' minimum and maximum back to the host)."""
    flat = ids.flatten().long()
    return torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def _grouped_mm(rows: torch.Tensor, matrices: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """``rows[ends[g-1]:ends[g]] @ matrices[g]`` for every group g (empty groups allowed), stacked: torch's grouped
    GEMM where it takes these operands (its kernels want 16-byte aligned strides, and a dtype the device
    implements), else a loop."""
    key = (rows.device.type, rows.dtype, rows.shape[1], matrices.shape[2], matrices.stride())
    aligned = all(dim * rows.element_size() % 16 == 0 for dim in key[2:4])  # also the backward's operands
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


class _Timer:
    """Seconds of work on a device queue: CUDA events on a stream (read later, without waiting), else wall time."""

    def __init__(self, stream: torch.cuda.Stream | None):
        self.stream = stream
        if stream is None:
            self.start = time.perf_counter()
        else:
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record(stream)

    def stop(self) -> "_Timer":
        if self.stream is None:
            self.end = time.perf_counter()
        else:
            self.end = torch.cuda.Event(enable_timing=True)
            self.end.record(self.stream)
        return self

    def seconds(self) -> float:
        if self.stream is None:
            return self.end - self.start
        self.end.synchronize()
        return self.start.elapsed_time(self.end) / 1e3


class _OnHost:
    """A host copy of a device tensor, made without waiting for it; :meth:`get` waits."""

    def __init__(self, tensor: torch.Tensor):
        self.ready = None
        if tensor.device.type != "cuda":
            self.value = tensor
            return
        self.value = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor, non_blocking=True)
        self.ready = torch.cuda.Event()
        self.ready.record(torch.cuda.current_stream(tensor.device))

    def get(self) -> torch.Tensor:
        if self.ready is not None:
            self.ready.synchronize()
            self.ready = None
        return self.value


class _StepStart:
    """Where a step begins on a device's queue: an event recorded when the step's first MoE layer is planned, so
    after the optimizer's update of the expert-LoRA factors; and a stream for their host copies, which wait for that
    event only (not for the layers queued since, nor for weights being fetched)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.event: torch.cuda.Event | None = None
        self.stream = torch.cuda.Stream(device)
        self._planned: set[int] = set()  # positions of the layers planned since the event
        self._known: set[int] = set()  # positions of the layers ever planned

    def planned(self, position: int) -> None:
        """A layer at ``position`` plans a new step: a layer planned again starts the next step; one never planned
        before (the first step's layers, a layer made anew after an optimizer step, another model's) moves the event
        to here without starting a step (the layers of the first step would otherwise each start one, and the next
        step's first layer, not planned since, none)."""
        again = position in self._planned
        if again or position not in self._known:
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(self.device))
        if again:
            self._planned = set()
        self._planned.add(position)
        self._known.add(position)


_step_starts: dict[torch.device, _StepStart] = {}


@dataclasses.dataclass
class _Window:
    """What one layer measured between two of its planned steps: the step's plan and routing (rows per expert),
    and the seconds of every pass of that step (forward, recompute, backward) on each side."""

    plan: TierPlan | None = None
    counts: _OnHost | None = None
    streamed: bool = False
    # per side, (pass, seconds or _Timer) of each measurement, the pass being 0 for a forward and 1 for a recompute or
    # a backward; "rest" is the non-expert work before each of the layer's expert parts, "span" each expert part on
    # the device's queue, from its start to its output (or dx) queued
    parts: dict = dataclasses.field(default_factory=lambda: {side: [] for side in (*_SIDES, "span")})

    def seconds(self) -> dict[str, tuple[float, float]]:
        """Per side, the seconds of the forward pass and of the backward pass."""
        out = {}
        for side, parts in self.parts.items():
            split = [0.0, 0.0]
            for backward, part in parts:
                split[backward] += part if isinstance(part, float) else part.seconds()
            out[side] = (split[0], split[1])
        return out


class _Gaps:
    """The time a device's queue spends between the expert parts of its MoE layers: a layer's non-expert work
    (attention, norms, the router), given to the layer whose expert part ends the gap when that part follows the one
    that opened it in the same pass: a later layer in a forward, the same or an earlier one in a backward (a
    recompute included). Other gaps span something else (the head and the loss between a forward and its backward,
    the step's end, the batches of an evaluation) and are no layer's. Layers are ordered by their tiers' making (at
    their first forward)."""

    def __init__(self):
        self._open: tuple[_Timer, bool, int] | None = None  # since the last expert part ended: (timer, backward, layer)
        self._layers = 0

    def position(self) -> int:
        """A new layer's place in the forward order."""
        self._layers += 1
        return self._layers - 1

    def close(self, backward: bool, position: int) -> _Timer | None:
        """An expert part starts: the gap since the last one ended, if it is this layer's."""
        opened, self._open = self._open, None
        if opened is None:
            return None
        timer, opened_in_backward, opened_at = opened
        follows = position <= opened_at if backward else position > opened_at
        return timer.stop() if follows and opened_in_backward == backward else None

    def open(self, timer: _Timer, backward: bool, position: int) -> None:
        """An expert part ended (``timer`` started there)."""
        self._open = (timer, backward, position)


_gaps: dict[torch.device, _Gaps] = {}


class _Cost:
    """Seconds per step of one side as ``per_unit * units + per_row * rows``, fitted by least squares to the last
    steps' measurements. The units are experts for the CPU (each one's weights are read from memory
    whatever its rows) and the link; for the accelerator they are its one share of the layer (a fixed time: launches,
    the LoRA factors' copies, which do not grow with its experts). Until the measured splits differ enough to tell
    the two terms apart (or where the fit makes one negative), ``unit_share`` of the time measured is put on the
    units and the rest on the rows."""

    STEPS = 4  # the fit sees this many past steps of every layer that shares the cost

    def __init__(self, unit_share: float):
        self.unit_share = unit_share
        self.samples: list[tuple[int, int, float]] = []  # (units, rows, seconds)
        self.layers: weakref.WeakSet = weakref.WeakSet()  # the kernels of the layers that share it (a tier made
        # anew for the same layer is not another; a layer whose kernel is gone no longer counts)
        self.per_unit = self.per_row = None

    @property
    def known(self) -> bool:
        return self.per_unit is not None

    def add(self, units: int, rows: int, seconds: float) -> None:
        if not units or seconds <= 0:
            return
        self.samples = [*self.samples[1 - self.STEPS * max(1, len(self.layers)):], (units, rows, seconds)]
        X = torch.tensor([[u, r] for u, r, _ in self.samples], dtype=torch.float64)
        y = torch.tensor([t for _, _, t in self.samples], dtype=torch.float64)
        fit = None
        if len(self.samples) > 1 and torch.linalg.matrix_rank(X / X.norm(dim=0).clamp_min(1e-30), tol=0.2) == 2:
            fit = torch.linalg.lstsq(X, y.unsqueeze(1)).solution.flatten()
            if bool((fit < 0).any()):  # noise, or a cost the two terms do not describe: keep to the prior split
                fit = None
        if fit is None:
            units, rows, seconds = (float(v) for v in X.sum(0).tolist() + [y.sum()])
            share = self.unit_share if rows else 1.0
            fit = torch.tensor([seconds * share / units, seconds * (1 - share) / rows if rows else 0.0],
                               dtype=torch.float64)
        self.per_unit, self.per_row = float(fit[0]), float(fit[1])

    def seconds(self, units: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return self.per_unit * units + self.per_row * rows


class _Rates:
    """What one step costs each side of a layer, from the steps measured (each summed over the step's passes): the
    CPU by its experts that have rows and by rows, the accelerator by a fixed time and rows, the link by streamed
    experts. The fits are shared by alike layers; ``scale`` corrects them for this layer by what it measured against
    what they (as they are when the measurement comes in) predict for what its last planned split was costed by
    (rows per expert forecast from past routing included), so that a forecast off for this layer still moves its
    split toward balance."""

    def __init__(self, cpu: _Cost | None = None, accelerator: _Cost | None = None, link: _Cost | None = None):
        self.cpu = cpu or _Cost(unit_share=0.5)
        self.accelerator = accelerator or _Cost(unit_share=1.0)
        self.link = link or _Cost(unit_share=1.0)
        self.steps = 0
        self.scale = {"cpu": 1.0, "accelerator": 1.0, "link": 1.0}  # measured over forecast, within [1/4, 4]
        self.rest = 0.0  # the layer's own non-expert seconds per step, averaged (the last step weighing half)
        # each side's share of its step time in the backward pass (a recompute included), averaged likewise: the
        # CPU's backward costs about twice its forward, the link fetches once per pass
        self.backward_share = dict.fromkeys(_SIDES, 0.5)
        # what the last steps with experts in the CPU kernel took beyond what their sides' measured times explain: the
        # host waits for the tokens and dy to be copied to it (the device's queue runs dry meanwhile) and for the
        # kernel's result, and a partial plan groups its rows with a sync
        self._overheads: list[float] = []

    OVERHEAD_STEPS = 3  # the overhead is the median of this many last measurements (one stalled step is not it)
    OVERHEAD_FADE = 0.9  # per step without a measurement

    @property
    def known(self) -> bool:
        return self.cpu.known and self.accelerator.known

    @property
    def split_overhead(self) -> float:
        """Seconds per step that a split calling the CPU kernel costs beyond its sides' times (0 before measured)."""
        return sorted(self._overheads)[(len(self._overheads) - 1) // 2] if self._overheads else 0.0

    def add(self, passes: dict[str, tuple[float, float]], window: _Window) -> None:
        """One step's measurements: per side, the seconds of its forward and of its backward pass."""
        self.steps += 1
        if self.steps == 1:
            return  # the first step warms up (CUDA context, kernels loaded, allocator growing)
        seconds = {side: forward + backward for side, (forward, backward) in passes.items()}
        for side in _SIDES:
            if seconds[side] > 0:
                share = passes[side][1] / seconds[side]
                self.backward_share[side] = share if self.steps == 2 else (self.backward_share[side] + share) / 2
        if seconds["rest"] > 0:  # else no expert part ran after another's in the step
            self.rest = seconds["rest"] if self.rest == 0 else (self.rest + seconds["rest"]) / 2
        if seconds["cpu"] > 0 and seconds["span"] > 0:
            explained = sum(max(passes["rest"][p] + max(passes["cpu"][p], passes["accelerator"][p]), passes["link"][p])
                            for p in (0, 1))
            self._overheads = [*self._overheads[-(self.OVERHEAD_STEPS - 1):],
                               max(seconds["span"] + seconds["rest"] - explained, 0.0)]
        else:  # not measured while the CPU kernel has nothing: fades, so that a split is measured again in time
            self._overheads = [overhead * self.OVERHEAD_FADE for overhead in self._overheads]
        counts, on = window.counts.get(), window.plan.mask(torch.device("cpu"))
        accelerator_rows, accelerator_experts = int(counts[on].sum()), int((counts[on] > 0).sum())
        cpu_experts, cpu_rows = int((counts > 0).sum()) - accelerator_experts, int(counts.sum()) - accelerator_rows
        samples = {
            "cpu": (cpu_experts, cpu_rows, seconds["cpu"]),
            "accelerator": (int(accelerator_experts > 0), accelerator_rows, seconds["accelerator"]),
            "link": (len(window.plan.experts) if window.streamed else 0, 0, seconds["link"])}
        forecast = window.plan.forecast or {}
        for side, (units, rows, spent) in samples.items():
            if units and spent > 0:  # the side worked in that step
                cost = getattr(self, side)
                predicted = cost.seconds(*forecast[side]) if side in forecast and cost.known else 0.0
                if predicted > 0:
                    self.scale[side] = min(max(spent / predicted, 0.25), 4.0)
                cost.add(units, rows, spent)


class SharedRates:
    """The step costs measured by the layers of one model. Layers of one shape share the CPU kernel's cost and, per
    device and tier, the accelerator's and the link's: each fit then sees the different splits of many layers,
    where one layer's splits change experts and rows together and cannot tell the two terms apart."""

    def __init__(self):
        self._costs: dict[tuple, _Cost] = {}

    def _cost(self, key: tuple, unit_share: float, kernel: ExpertKernel) -> _Cost:
        cost = self._costs.setdefault(key, _Cost(unit_share))
        cost.layers.add(kernel)
        return cost

    def for_layer(self, kernel: ExpertKernel, device: torch.device, tier: str) -> _Rates:
        shape = (kernel.num_experts, kernel.hidden_size, kernel.intermediate_size, kernel.dtype, kernel.threads)
        return _Rates(self._cost(("cpu", shape), 0.5, kernel),
                      self._cost(("accelerator", device, tier, shape), 1.0, kernel),
                      self._cost(("link", device, shape), 1.0, kernel))


@dataclasses.dataclass(frozen=True, eq=False)
class _FetchedRows:
    """A streamed layer's packed rows of ``plan``'s experts on the device, by matrix, ready once ``ready`` is."""

    plan: TierPlan
    packed: dict[str, torch.Tensor]
    ready: torch.cuda.Event | None
    stream: torch.cuda.Stream  # the compute stream whose memory the rows are in
    factors: _FactorCopies | None = None

    def tensors(self) -> list[torch.Tensor]:
        return [*self.packed.values(), *(self.factors.tensors if self.factors is not None else ())]


@dataclasses.dataclass(frozen=True, eq=False)
class _FactorCopies:
    """A streamed layer's expert-LoRA factors in host memory, copied to the device with its rows (on the link's queue:
    a copy on the compute stream would wait behind the fetches queued there): what they were copied from, and in
    which step (:class:`_StepStart`: an optimizer may step the factors between steps without a new version)."""

    sources: _FactorSources
    tensors: list[torch.Tensor]
    step: torch.cuda.Event | None


class _Prefetcher:
    """The accelerator tiers of one model on one device in the order of its forward, and the streamed layers fetched
    ahead: the next few in the pass's direction (:attr:`AcceleratorTier.fetch_depth`).

    The link is kept busy by the device's queue, not by the host: a fetch's buffer comes from the compute stream's
    pool, where the host has just let go of the rows the layer before unpacked, and the copy waits on the device for
    that unpacking (not for the host to reach the layer, which a full launch queue holds back while the device waits
    for the link). So the streamed layers hold at most the packed rows of the layers fetched ahead and one layer's
    unpacked weights (:func:`_stream_buffers`), and a fetch waits for no more than the layers before it to be
    unpacked."""

    def __init__(self, copy_stream: torch.cuda.Stream):
        self._order: list[weakref.ref] = []
        # (the tier's holder, its rows), in the pass's order. A fetch in flight holds its tier strongly (the copy reads
        # its kernel's memory); rows kept after use hold it weakly, so a model deleted (or a layer's tier replaced)
        # does not live on through them.
        self._ahead: list[tuple[Callable[[], AcceleratorTier | None], _FetchedRows]] = []
        self.copy_stream = copy_stream

    def register(self, tier: AcceleratorTier) -> None:
        self._order = [ref for ref in self._order if ref() is not None]
        if not any(ref() is tier for ref in self._order):
            self._order.append(weakref.ref(tier))

    def _following(self, tier: AcceleratorTier, backward: bool) -> list[AcceleratorTier] | None:
        """The streamed layers that run after ``tier`` in its pass (before it, in a backward), nearest first; None
        where ``tier`` is not in the order."""
        tiers = [ref() for ref in self._order]
        if tier not in tiers:
            return None
        at = tiers.index(tier)
        after = reversed(tiers[:at]) if backward else tiers[at + 1:]
        return [t for t in after if t is not None and t.resident is None]

    def keep(self, tier: AcceleratorTier, backward: bool, used: _FetchedRows) -> bool:
        """Where ``tier`` is among the last streamed layers of its pass, the rows it has just ``used`` stay ahead
        (True): the next pass starts with these layers (the backward with the forward's last, the next step's forward
        with the backward's), and their frozen weights need not cross the link again. A forward keeps its last
        layer's rows only, through the head and the loss (the step's peak at long sequences); a backward the last
        ``tier.fetch_depth`` (the stream buffers), through the optimizer's step."""
        following = self._following(tier, backward)
        stay = tier.fetch_depth if backward else 1
        if following is None or len(following) >= stay or len(self._ahead) >= stay:
            return False
        entry = (weakref.ref(tier), used)
        # the next pass runs the other way: these rows go after those fetched for the rest of this pass, before those
        # kept from its earlier layers
        at = sum(1 for holder, _ in self._ahead if holder() in following)
        self._ahead.insert(at, entry)
        return True

    def fetch_next(self, tier: AcceleratorTier, backward: bool) -> None:
        """Have the streamed layers that run after ``tier`` in its pass fetched for their plans, up to
        ``tier.fetch_depth`` of them; called once ``tier``'s own packed rows are unpacked and let go (their buffer
        is free for the next fetch)."""
        after = self._following(tier, backward) or []
        following = after[:tier.fetch_depth]
        if not following:
            return
        wanted = [(target, target.step_plan if backward else target.upcoming_plan()) for target in following]
        wanted = [(target, plan) for target, plan in wanted if plan is not None and plan.any]
        found = [next((rows for holder, rows in self._ahead if holder() is target and rows.plan == plan), None)
                 for target, plan in wanted]
        # rows kept for the next pass by layers this pass has run (:meth:`keep`) stay, after the ones it still needs
        kept = [(holder, rows) for holder, rows in self._ahead if holder() is not None and holder() not in after
                and holder() is not tier]
        self._release([(holder, rows) for holder, rows in self._ahead
                       if not any(rows is other for other in found) and not any(rows is other for _, other in kept)])
        self._ahead = []
        try:
            for at, ((target, plan), rows) in enumerate(zip(wanted, found)):
                rows = target.fetch(plan, backward) if rows is None else target.with_current_factors(rows)
                self._ahead.append(((lambda target=target: target), rows))
        except BaseException as error:  # out of memory: these layers are fetched when they run instead
            self._release([(None, later) for later in found[at:] if later is not None])
            self._release(kept)
            if not isinstance(error, torch.OutOfMemoryError):
                raise
            torch.cuda.empty_cache()
            return
        self._ahead += kept

    def take(self, tier: AcceleratorTier, plan: TierPlan) -> _FetchedRows | None:
        """The rows fetched ahead (or kept) for ``tier``'s ``plan`` (the caller's stream waits for them), or None;
        rows ahead of them in the order are dropped (the pass has moved past their layers), and everything ahead is
        where there are none: the caller fetches its own now."""
        for at, (holder, rows) in enumerate(self._ahead):
            if holder() is tier and rows.plan == plan:
                self._release(self._ahead[:at])
                self._ahead = self._ahead[at + 1:]
                return rows
        self.drop()
        return None

    def forget(self, tier: AcceleratorTier) -> None:
        """Let the rows ahead for ``tier`` go."""
        self._release([entry for entry in self._ahead if entry[0]() is tier])
        self._ahead = [entry for entry in self._ahead if entry[0]() is not tier]

    def drop(self) -> None:
        """Let the rows ahead go."""
        ahead, self._ahead = self._ahead, []
        self._release(ahead)

    def _release(self, entries) -> None:
        """Rows that will not be used: their memory (the compute stream's) returns once the copies queued so far
        are done."""
        for _, rows in entries:
            for tensor in rows.tensors():
                tensor.record_stream(self.copy_stream)


# the prefetchers of each patched model (its layers share one budget) by device: another model's layers are not in
# its order (they would be fetched ahead of its next pass); they go with the model
_prefetchers: weakref.WeakKeyDictionary[GpuExpertBudget, dict[torch.device, _Prefetcher]] = weakref.WeakKeyDictionary()
_copy_streams: dict[torch.device, torch.cuda.Stream] = {}  # one per device, for every model's fetches: the link serves
# them in order


def _prefetcher(budget: GpuExpertBudget, device: torch.device) -> _Prefetcher:
    by_device = _prefetchers.setdefault(budget, {})
    if device not in by_device:
        if device not in _copy_streams:
            _copy_streams[device] = torch.cuda.Stream(device)
        by_device[device] = _Prefetcher(_copy_streams[device])
    return by_device[device]


@dataclasses.dataclass
class _Groups:
    """The accelerator's slots grouped by expert: the expert of each group, token and slot of each row, its group,
    the groups' ends (all on the device)."""

    experts: torch.Tensor
    tokens: torch.Tensor
    slots: torch.Tensor
    group: torch.Tensor
    ends: torch.Tensor


@dataclasses.dataclass(frozen=True)
class _FactorSources:
    """The expert-LoRA factor tensors a copy was made from, and their versions then: the copy stands for them while
    they are the same tensors (held weakly: a new tensor may take a freed one's id) and unchanged in place as far as
    torch knows."""

    tensors: tuple  # weak references
    versions: tuple

    @classmethod
    def of(cls, lora: ExpertLora) -> _FactorSources:
        return cls.of_tensors(lora.tensors())

    @classmethod
    def of_tensors(cls, tensors: list[torch.Tensor]) -> _FactorSources:
        return cls(tuple(weakref.ref(t) for t in tensors), tuple(t._version for t in tensors))

    def unchanged(self, lora: ExpertLora) -> bool:
        tensors = lora.tensors()
        return (len(tensors) == len(self.tensors) and all(ref() is t for ref, t in zip(self.tensors, tensors))
                and tuple(t._version for t in tensors) == self.versions)


@dataclasses.dataclass(frozen=True)
class _HostFactors:
    """Host copies of the device's expert-LoRA factors for the CPU kernel (their scalings with them), and what they
    were copied from."""

    step: int  # the tier's step
    inference: bool  # copied for a forward of a module in eval mode without autograd
    copies: ExpertLora
    sources: _FactorSources

    def copied(self, lora: ExpertLora) -> bool:
        """Whether these are copies of ``lora`` as it is now (the same tensors, unchanged, with the same scalings)."""
        return self.sources.unchanged(lora) and [f.scaling for _, f in lora.items()] == \
            [f.scaling for _, f in self.copies.items()]


class AcceleratorTier:
    """The accelerator's share of one MoE layer's routed experts, on ``device`` (a CPU device runs the same torch code:
    how the split is tested without a GPU); ``position``: the layer's place in the model's order among those sharing
    ``budget`` (:meth:`GpuExpertBudget.add`)."""

    def __init__(self, kernel: ExpertKernel, device: torch.device, *, executor: str, budget: GpuExpertBudget,
                 accelerator_fraction: float | None, shared_rates: SharedRates | None = None,
                 position: int | None = None, gate_up_bias=None, down_bias=None):
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.kernel, self.device, self.executor = kernel, device, executor
        self.fraction = accelerator_fraction
        self.spec = kernel.spec
        self.packed = kernel.packed_weights()
        self.resident = None
        self._all_experts = TierPlan(tuple(range(kernel.num_experts)), kernel.num_experts)  # its tensors made once
        resident, self.fetch_depth = budget.take(kernel, device, position)  # the depth: layers fetched ahead of it
        if resident:
            self.resident = {name: kernel.unpack(self.packed[name].to(device), name) for name in _MATRICES}
        elif device.type == "cuda":
            _pin_in_place(kernel, self.packed.values())
        self.prefetcher, self.copy_stream = None, None
        if device.type == "cuda":  # resident layers take part too: they start the fetch of the streamed layer after
            self.prefetcher = _prefetcher(budget, device)
            self.copy_stream = self.prefetcher.copy_stream if self.resident is None else None
        gu_bias = None if gate_up_bias is None else gate_up_bias.detach().float()
        gu_bias = _gate_then_up(gu_bias, 1) if gu_bias is not None and self.spec.interleaved else gu_bias
        self.biases = (None if gu_bias is None else gu_bias.to(device),
                       None if down_bias is None else down_bias.detach().float().to(device))
        self.rates = (shared_rates or SharedRates()).for_layer(kernel, device, self.tier_name)
        # seconds each side worked on this layer, summed over its steps whose measurements are in (a step's are
        # read when the next one is planned): "cpu" (the kernel), "accelerator" (compute), "link" (streaming), and
        # "rest": the device's queue on the layer's non-expert work
        self.busy_seconds = {"cpu": 0.0, "accelerator": 0.0, "link": 0.0, "rest": 0.0}
        self._gaps = _gaps.setdefault(device, _Gaps())
        self._position = self._gaps.position()
        self._window = _Window()
        self.step_plan: TierPlan | None = None  # the plan of the step under way
        self._next_plan: TierPlan | None = None  # the next step's, once asked for (by a fetch ahead)
        self._last_counts: _OnHost | None = None  # rows per expert in the last step's routing
        self._popularity: torch.Tensor | None = None  # rows per expert averaged over the past steps planned ahead
        # the order of a plan made ahead (busiest first by popularity), and the rows each place in that order got in
        # the step it was planned for, averaged over the past steps: the rows its next plan is costed by
        self._popular_order: torch.Tensor | None = None
        self._rows_by_place: torch.Tensor | None = None
        self._recorded = None  # a recompute's forward under autograd, for the backward that follows it
        self._steps = 0  # steps planned
        if device.type == "cuda" and device not in _step_starts:
            _step_starts[device] = _StepStart(device)
        self._step_start = _step_starts.get(device)
        self._host_lora: _HostFactors | None = None
        # the expert-LoRA factors this layer was last called with, where they are in host memory (weak references):
        # fetched with its rows
        self._host_factors: list[weakref.ref] | None = None
        self._span: _Timer | None = None  # since the expert part under way started

    @property
    def tier_name(self) -> str:
        return "resident" if self.resident is not None else "streamed"

    # ------------------------------------------------------------------------------------------------ plan
    def plan(self, ids: torch.Tensor, first_forward: bool, inference: bool = False) -> TierPlan:
        """The split of this call: a new step's (``first_forward``: not a checkpoint's recompute), else the plan of
        the step under way. ``inference``: a forward of a module in eval mode without autograd."""
        if not first_forward and self.step_plan is not None:
            return self.step_plan
        self._steps += 1
        if not inference:  # an optimizer may step the factors after it: host copies made before are not shared
            self._host_lora = None
        if self._step_start is not None:
            self._step_start.planned(self._position)
        counts = _OnHost(_rows_per_expert(ids, self.kernel.num_experts))
        if self.executor == "accelerator":  # every expert, whatever the routing: no wait for it
            self._close_window()
            plan = self._all_experts
        elif self._last_counts is None or (self.resident is not None and not self.step_plan.everything):
            # a resident layer that gave the CPU experts last step plans from the routing at hand (as any layer's
            # first step): which experts are hot matters to the split, and it has nothing to fetch ahead
            self._close_window()
            plan = self._choose(counts.get())
        else:
            # the host does not wait here for the device to reach this layer's routing: a resident layer whose last
            # split kept every expert plans as a streamed one does, from past routing
            plan = self.upcoming_plan()
        if self.prefetcher is not None and not plan.any:
            self.prefetcher.forget(self)  # rows kept for this layer would stay through the step, unused
        self._next_plan, self._last_counts, self.step_plan = None, counts, plan
        self._window.plan, self._window.counts, self._window.streamed = plan, counts, self.resident is None
        if self.prefetcher is not None:
            self.prefetcher.register(self)
        return plan

    def upcoming_plan(self) -> TierPlan | None:
        """The layer's next plan, chosen before its routing is known (a streamed layer's so that it is fetched ahead,
        a resident one's so that the host does not wait for the device to reach the layer): from how
        busy each expert has been (rows per expert averaged over the past steps, each step's weight halving the
        next; the busiest experts of one step need not be the next step's) and the rates measured over this step.
        None before the first step."""
        if self._next_plan is None and self._last_counts is not None:
            self._close_window()
            counts = self._last_counts.get().double()
            if self._popular_order is not None:
                got = counts[self._popular_order]
                self._rows_by_place = got if self._rows_by_place is None else (self._rows_by_place + got) / 2
            self._popularity = counts if self._popularity is None else (self._popularity + counts) / 2
            self._popular_order = torch.sort(self._popularity, descending=True, stable=True).indices
            self._next_plan = self._choose(self._popularity, self._rows_by_place)
        return self._next_plan

    def _close_window(self) -> None:
        window = self._window
        if window.plan is None:
            return  # no step planned yet
        passes = window.seconds()
        for side in self.busy_seconds:
            self.busy_seconds[side] += sum(passes[side])
        self.rates.add(passes, window)
        self._window = _Window()

    def _choose(self, counts: torch.Tensor, rows_by_place: torch.Tensor | None = None) -> TierPlan:
        """The plan that gives the accelerator the experts busiest by ``counts``; costed by the rows of each place in
        that order: ``rows_by_place`` where given (what past plans' places got), else the sorted ``counts``."""
        E = self.kernel.num_experts
        if self.executor == "accelerator":
            return self._all_experts
        order = torch.sort(counts, descending=True, stable=True).indices
        chosen, forecast = (round(self.fraction * E), None) if self.fraction is not None else \
            self._balanced_count(counts[order] if rows_by_place is None else rows_by_place)
        if logger.isEnabledFor(logging.DEBUG):
            rates = {side: None if not cost.known else f"{cost.per_unit * 1e3:.3f} ms + {cost.per_row * 1e6:.3f} us/row"
                     f" x {self.rates.scale[side]:.2f}"
                     for side, cost in (("cpu", self.rates.cpu), ("accelerator", self.rates.accelerator),
                                        ("link", self.rates.link))}
            logger.debug("kt_patch: %s (%s): %d of %d experts on the accelerator; step costs per unit %s, "
                         "non-expert %.3f ms", self.kernel.name, self.tier_name, chosen, E, rates,
                         self.rates.rest * 1e3)
        if chosen == E:  # shares the device tensors of the plan with every expert (made once)
            return TierPlan(self._all_experts.experts, E, forecast, self._all_experts._on_device)
        return TierPlan(tuple(sorted(order[:chosen].tolist())), E, forecast)

    def _balanced_count(self, place_rows: torch.Tensor) -> tuple[int, dict | None]:
        """How many of the busiest experts go to the accelerator for the layer's shortest step (the module's
        docstring), given the rows forecast for each place of the order, busiest first; and the units and rows each
        side was costed by at that split (:attr:`TierPlan.forecast`)."""
        rates = self.rates
        if not rates.known:
            # no measurement yet: the least busy eighth on the CPU, to measure both sides (the layers of one shape
            # share the CPU's fit, so a small share each gives it samples enough; a large one costs the first steps)
            return place_rows.numel() - max(1, place_rows.numel() // 8), None
        zero = torch.zeros(1, dtype=torch.float64)
        rows = torch.cat((zero, torch.cumsum(place_rows.double(), 0)))  # the n busiest experts' rows
        # ...and those with rows (an average of past steps' rows: half a row or more)
        experts = torch.cat((zero, torch.cumsum((place_rows >= 0.5).double(), 0)))
        n = torch.arange(rows.numel(), dtype=torch.float64)
        inputs = {"cpu": (experts[-1] - experts, rows[-1] - rows), "accelerator": ((n > 0).double(), rows),
                  "link": (n, 0 * n)}
        streams = self.resident is None and rates.link.known
        cpu, accelerator, link = (getattr(rates, side).seconds(*inputs[side]) * rates.scale[side]
                                  if side != "link" or streams else 0 * n for side in inputs)
        cost = 0 * n
        for backward in (False, True):  # the link overlaps each pass's computation, not the other pass's
            part = {side: share if backward else 1 - share for side, share in rates.backward_share.items()}
            cost = cost + torch.maximum(
                rates.rest * part["rest"] + torch.maximum(cpu * part["cpu"], accelerator * part["accelerator"]),
                link * part["link"])
        cost = cost + rates.split_overhead * (n < n[-1]).double()  # the kernel is called unless n is every expert
        chosen = int(torch.argmin(cost))
        if cost[chosen] > (1 - _CPU_SPLIT_GAIN) * cost[-1]:
            chosen = n.numel() - 1
        return chosen, {side: (float(units[chosen]), float(rows[chosen])) for side, (units, rows) in inputs.items()}

    def host_lora(self, lora: ExpertLora, inference: bool = False) -> ExpertLora:
        """``lora`` as the CPU kernel reads it: itself where its factors are in host memory; factors on the device as
        pinned host copies made once per step (an optimizer changes them only between steps, and may do so without
        bumping their versions), copied after the step's start (:class:`_StepStart`), so the copy waits neither for
        the layers queued since nor for the weights being fetched. ``inference``: a forward of a module in eval mode
        without autograd (evaluation, generation: each plans a step of its own); such forwards share one copy while
        the factors are the same tensors with the same versions and scalings (a forward in train mode between them
        makes a new one)."""
        if all(t.device.type == "cpu" for t in lora.tensors()):
            return lora.on_host()
        cached = self._host_lora
        if cached is not None and (cached.step == self._steps or (inference and cached.inference)) and \
                cached.copied(lora):
            return cached.copies
        start = self._step_start
        if start is None:  # a device without CUDA streams: copied in its queue's order
            copies = lora.on_host()
        else:
            start.stream.wait_event(start.event)
            with torch.cuda.stream(start.stream):
                copies = lora.on_host(non_blocking=True)
            start.stream.synchronize()
        self._host_lora = _HostFactors(self._steps, inference, copies, _FactorSources.of(lora))
        return copies

    def pin_factors(self, lora: ExpertLora) -> None:
        """Keep ``lora``'s host factors in pinned memory, so that their copies to the device do not block. Called
        before the CPU kernel is given them: moving a factor's values replaces its storage."""
        if self.device.type == "cuda":
            for factor in lora.tensors():
                if factor.device.type == "cpu":
                    _move_to_pinned(factor)

    def begin_experts(self, backward: bool) -> None:
        """This layer's expert part of a pass starts (``backward``: a recompute or a backward): the gap since the
        device's last expert part ended is this layer's non-expert time."""
        gap = self._gaps.close(backward, self._position)
        if gap is not None:
            self._window.parts["rest"].append((backward, gap))
        self._span = self._compute_timer()

    def end_experts(self, backward: bool) -> None:
        """This layer's expert part of a pass ended (its output, or dx, is queued)."""
        if self._span is not None:
            self._window.parts["span"].append((backward, self._span.stop()))
            self._span = None
        self._gaps.open(self._compute_timer(), backward, self._position)

    def record_cpu_time(self, seconds: float, backward: bool) -> None:
        """The CPU kernel's seconds on this layer's share in one pass of the step (``backward``: a recompute or a
        backward)."""
        self._window.parts["cpu"].append((backward, seconds))

    # ------------------------------------------------------------------------------------------------ weights
    def fetch(self, plan: TierPlan, backward: bool) -> _FetchedRows:
        """Start copying ``plan``'s packed rows on the copy stream, for a forward or (``backward``) a recompute or a
        backward, into memory of the compute stream's pool: the copy waits for the work queued there so far (which
        may have used that memory) and the compute stream for the copy before it unpacks the rows (:meth:`_weights`:
        on the copy stream the unpacking would hold back the next layer's copy)."""
        compute = torch.cuda.current_stream(self.device)
        # all the memory first: out of it, nothing has been queued to write into what is let go
        packed = {name: torch.empty((len(plan.experts), self.packed[name].shape[1]), dtype=self.packed[name].dtype,
                                    device=self.device) for name in _MATRICES}
        hosts, factors = self._factor_buffers()
        stream = self.copy_stream
        stream.wait_stream(compute)
        timer = _Timer(stream)
        with torch.cuda.stream(stream):
            for name in _MATRICES:
                src, dst = self.packed[name], packed[name]
                for at, first, count in _runs(plan.experts):  # a copy per run of consecutive experts
                    dst[at:at + count].copy_(src[first:first + count], non_blocking=True)
        rows = self._queue_factors(_FetchedRows(plan, packed, None, compute), hosts, factors)
        self._window.parts["link"].append((backward, timer.stop()))
        return rows

    def with_current_factors(self, rows: _FetchedRows) -> _FetchedRows:
        """``rows`` (fetched or kept ahead) with copies of this layer's host factors made in this step: rows kept
        from a step before get theirs on the copy stream, ahead of the fetches queued after them."""
        copies = rows.factors
        if self._host_factors is None or (copies is not None and copies.step is self._step_start.event):
            return rows
        hosts, factors = self._factor_buffers()
        for tensor in copies.tensors if copies is not None else ():  # their copy may not be done yet
            tensor.record_stream(self.copy_stream)
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        return self._queue_factors(rows, hosts, factors)

    def _factor_buffers(self) -> tuple[list[torch.Tensor], _FactorCopies | None]:
        """The host factors this layer was last called with (if they are alive), and device memory for their copies
        (of the compute stream's pool: the copy stream must wait for it before writing)."""
        hosts = [ref() for ref in self._host_factors] if self._host_factors is not None else []
        if not hosts or any(t is None for t in hosts):
            return [], None
        return hosts, _FactorCopies(_FactorSources.of_tensors(hosts),
                                    [torch.empty(t.shape, dtype=t.dtype, device=self.device) for t in hosts],
                                    self._step_start.event)

    def _queue_factors(self, rows: _FetchedRows, hosts: list[torch.Tensor],
                       factors: _FactorCopies | None) -> _FetchedRows:
        """``rows`` with the copies of ``hosts`` into ``factors`` queued on the copy stream, and a new ``ready``
        event after them."""
        with torch.cuda.stream(self.copy_stream):
            for host, dst in zip(hosts, factors.tensors if factors is not None else ()):
                dst.copy_(host.detach(), non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.copy_stream)
        return dataclasses.replace(rows, ready=ready, factors=factors)

    def _weights(self, plan: TierPlan, backward: bool, lora: ExpertLora) -> tuple[dict, dict, _Timer]:
        """[n, N, K] weights of the groups :meth:`_groups` makes: the layer's own (resident), else ``plan``'s (for a
        forward, or a recompute or backward); ``lora``'s factors on the device (:meth:`_device_factors`); and a timer
        of the accelerator's work, started before any unpacking. The following layers' fetches are queued last."""
        on_host = self.device.type == "cuda" and all(t.device.type == "cpu" for t in lora.tensors())
        self._host_factors = [weakref.ref(t) for t in lora.tensors()] if on_host and lora.tensors() else None
        if self.resident is not None:
            timer = self._compute_timer()
            factors = self._device_factors(lora)
            if self.prefetcher is not None:
                self.prefetcher.fetch_next(self, backward)
            return self.resident, factors, timer
        if self.copy_stream is None:
            timer = self._compute_timer()
            experts = torch.tensor(plan.experts, dtype=torch.long)
            return {name: self.kernel.unpack(self.packed[name][experts].to(self.device), name)
                    for name in _MATRICES}, self._device_factors(lora), timer
        rows = self.prefetcher.take(self, plan)
        if rows is None:
            rows = self.fetch(plan, backward)
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(rows.ready)
        if stream != rows.stream:  # rows fetched for another stream (kept from a pass that ran there)
            for tensor in rows.tensors():
                tensor.record_stream(stream)
        timer = self._compute_timer()
        weights = {name: self.kernel.unpack(rows.packed[name], name) for name in _MATRICES}
        copies = rows.factors
        fetched = copies.tensors if copies is not None and copies.step is self._step_start.event and \
            copies.sources.unchanged(lora) else None
        factors = self._device_factors(lora, fetched)
        if not self.prefetcher.keep(self, backward, rows):
            del rows  # unpacked: the next fetch may take its buffer
            self.prefetcher.fetch_next(self, backward)
        return weights, factors, timer

    def _group_experts(self, plan: TierPlan) -> torch.Tensor:
        """The expert of each group (on the device): a resident layer groups all its experts (those of the CPU
        empty), which spares gathering their weights; a streamed one only the fetched ones."""
        return self._all_experts.index(self.device) if self.resident is not None else plan.index(self.device)

    def _groups(self, ids: torch.Tensor, plan: TierPlan) -> _Groups:
        experts = self._group_experts(plan)
        if plan.everything:  # every slot is the accelerator's and each expert its own group: sizes known, no sync
            flat = ids.flatten()
            order = torch.argsort(flat, stable=True)
            ends = torch.cumsum(_rows_per_expert(flat, experts.numel()), 0).to(torch.int32)
            return _Groups(experts, order // ids.shape[1], order % ids.shape[1], flat[order], ends)
        position = torch.full((self.kernel.num_experts,), -1, dtype=torch.long, device=self.device)
        position[experts] = torch.arange(experts.numel(), device=self.device)
        position = position.masked_fill(~plan.mask(self.device), -1)
        slot_position = position[ids]
        tokens, slots = torch.nonzero(slot_position >= 0, as_tuple=True)
        group = slot_position[tokens, slots]
        order = torch.argsort(group, stable=True)
        tokens, slots, group = tokens[order], slots[order], group[order]
        ends = torch.cumsum(_rows_per_expert(group, experts.numel()), 0).to(torch.int32)
        return _Groups(experts, tokens, slots, group, ends)

    def _device_factors(self, lora: ExpertLora, fetched: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """fp32 factors on the device, expert-major: A [E, r, in], B [E, out, r] (gate rows first), from ``lora``'s
        factors or from ``fetched`` copies of them (:meth:`fetch`). Made anew at every call: a copy kept from the
        forward to the backward would hold the device memory of every layer's factors through the step's peak (the
        head and the loss, at long sequences), and factors on the device may have been written by an optimizer
        without a new version (``.data``)."""
        tensors = iter(fetched if fetched is not None else [t.detach() for t in lora.tensors()])
        E, out = self.kernel.num_experts, {}
        for which, factors in lora.items():
            rank = factors.A.shape[0] // E
            A = next(tensors).to(self.device, torch.float32, non_blocking=True).view(E, rank, -1)
            B = next(tensors).to(self.device, torch.float32, non_blocking=True)
            B = B.view(B.shape[0], rank, E).permute(2, 0, 1)
            B = _gate_then_up(B, 1) if which == "gate_up" and self.spec.interleaved else B
            out[f"{which}_A"], out[f"{which}_B"] = A, B.contiguous()  # the grouped GEMM's layout
        return out

    def _lora_of_groups(self, factors: dict[str, torch.Tensor], groups: _Groups) -> dict[str, torch.Tensor]:
        """The groups' rows of the :meth:`_device_factors`, as new leaves (for the backward)."""
        if self.resident is not None:  # every expert is a group
            return {key: t.detach() for key, t in factors.items()}
        return {key: t[groups.experts] for key, t in factors.items()}

    # ------------------------------------------------------------------------------------------------ compute
    def _run(self, x, w, groups: _Groups, weights, lora_groups, scalings) -> torch.Tensor:
        """``sum_j w[t,j] expert(x[t])`` over the accelerator's slots, differentiable in x, w and the LoRA groups:
        every product one grouped GEMM over the groups."""
        T, H = x.shape
        tokens, ends = groups.tokens, groups.ends
        rows = x[tokens]
        gate_bias, down_bias = self.biases
        dtype = rows.dtype
        gate = _grouped_mm(rows, weights["gate"].transpose(1, 2), ends)
        up = _grouped_mm(rows, weights["up"].transpose(1, 2), ends)
        if "gate_up_A" in lora_groups:
            low = _grouped_mm(rows, lora_groups["gate_up_A"].to(dtype).transpose(1, 2), ends)
            low = _grouped_mm(low, lora_groups["gate_up_B"].to(dtype).transpose(1, 2), ends) * scalings["gate_up"]
            gate, up = gate + low[:, :gate.shape[1]], up + low[:, gate.shape[1]:]
        row_expert = groups.experts[groups.group] if gate_bias is not None or down_bias is not None else None
        if gate_bias is not None:
            row_bias = gate_bias[row_expert].to(dtype)
            gate, up = gate + row_bias[:, :gate.shape[1]], up + row_bias[:, gate.shape[1]:]
        z = self._activate(gate, up)
        down = _grouped_mm(z, weights["down"].transpose(1, 2), ends)
        if "down_A" in lora_groups:
            low = _grouped_mm(z, lora_groups["down_A"].to(dtype).transpose(1, 2), ends)
            down = down + _grouped_mm(low, lora_groups["down_B"].to(dtype).transpose(1, 2), ends) * scalings["down"]
        if down_bias is not None:
            down = down + down_bias[row_expert].to(dtype)
        weighted = down.float() * w[tokens, groups.slots].float().unsqueeze(1)
        return torch.zeros(T, H, dtype=torch.float32, device=x.device).index_add(0, tokens, weighted)

    def _activate(self, gate, up):
        spec = self.spec
        if spec.activation == "swiglu":
            return F.silu(gate) * up
        gate = gate.clamp(max=spec.limit)
        up = up.clamp(-spec.limit, spec.limit)
        return (up + 1) * gate * torch.sigmoid(spec.alpha * gate)

    def _compute_timer(self) -> _Timer:
        return _Timer(torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None)

    def forward(self, x, ids, w, lora: ExpertLora, plan: TierPlan, for_backward: bool = False) -> torch.Tensor:
        """The accelerator's share of y (fp32, on the device). ``for_backward``: the backward comes next (a
        checkpointed layer's recompute), so the computation is recorded for it instead of being redone there."""
        self._recorded = None
        try:
            groups = self._groups(ids.to(self.device), plan)  # a partial plan syncs: before waiting on weights
            weights, factors, timer = self._weights(plan, for_backward, lora)
            if for_backward:
                self._recorded = self._record(x, w, lora, plan, groups, weights, factors)
                y = self._recorded[-1].detach()
            else:
                with torch.no_grad():
                    y = self._run(x.to(self.device), w.to(self.device), groups, weights, self._lora_of_groups(
                        factors, groups), {which: f.scaling for which, f in lora.items()})
        except torch.OutOfMemoryError:
            self._recorded = None
            self._warn_out_of_memory("forward")
            return self._on_cpu(x, ids, w, lora, plan)[0]
        self._window.parts["accelerator"].append((for_backward, timer.stop()))
        return y

    def _peft_layout(self, key: str, grad: torch.Tensor | None, experts: torch.Tensor, factor: torch.Tensor):
        """The gradient of the groups' rows of one LoRA factor as the whole factor's, in PEFT's layout (zero for the
        other experts), on the device: A [E*r, in] expert-major, B [out, r*E] expert-minor (gate, up rows
        alternating where the family interleaves them)."""
        E = self.kernel.num_experts
        if grad is None:  # no row reached these factors
            return torch.zeros(factor.shape, dtype=torch.float32, device=self.device)
        everything = experts.numel() == E  # then the groups are the experts in order
        if key.endswith("_A"):
            full = grad if everything else grad.new_zeros(E, *grad.shape[1:]).index_copy_(0, experts, grad)
            return full.reshape(factor.shape)
        if key == "gate_up_B" and self.spec.interleaved:
            half = grad.shape[1] // 2
            grad = torch.stack((grad[:, :half], grad[:, half:]), dim=2).reshape(grad.shape)
        full = grad.permute(1, 2, 0)  # [out, r, n]
        if not everything:
            full = grad.new_zeros(*full.shape[:2], E).index_copy_(2, experts, full)
        return full.reshape(factor.shape)

    def _to_factor(self, grad: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """``grad`` (fp32, on the device) where ``factor`` is: as it is on the device, else in a new host tensor it is
        copied into without waiting (pinned memory from torch's caching host allocator, which keeps a block until
        the copies that use it are done)."""
        if factor.device == self.device or self.device.type != "cuda":
            return grad.float().contiguous()
        host = torch.empty(grad.shape, dtype=torch.float32, pin_memory=True)
        return host.copy_(grad, non_blocking=True)

    def _warn_out_of_memory(self, where: str) -> None:
        logger.warning("kt_patch: %s: out of accelerator memory in the %s; the CPU kernel computes this call's "
                       "accelerator experts instead", self.kernel.name, where)
        if self.prefetcher is not None:
            self.prefetcher.drop()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _on_cpu(self, x, ids, w, lora: ExpertLora, plan: TierPlan, dy=None):
        """The accelerator's slots computed by the CPU kernel instead (out of accelerator memory): ``(y, dx, dw,
        lora_grads)`` on the device, the last three with ``dy``."""
        x_cpu = self.kernel.host_tokens(x)
        ids = ids.cpu()
        own_ids = ids.masked_fill(~plan.mask(ids.device)[ids], -1)
        lora = self.host_lora(lora)
        y, ctx = self.kernel.forward(x_cpu, own_ids, w, lora, save_for_backward=dy is not None)
        y = y.to(self.device, torch.float32)
        if dy is None:
            return y, None, None, None
        lora_parts = ctx.new_lora_grads()
        dx, dw = self.kernel.backward(ctx, self.kernel.host_tokens(dy, x_cpu.dtype), lora_parts)
        return y, dx.to(self.device), dw.to(self.device), lambda into=None: _add_into(into, lora_parts)

    def _record(self, x, w, lora, plan, groups, weights, factors):
        """The accelerator's forward under autograd, from leaves: ``(plan, x, w, LoRA groups, y)``."""
        x_leaf = x.detach().to(self.device).requires_grad_(True)
        w_leaf = w.detach().to(self.device).requires_grad_(True)
        lora_groups = {key: t.requires_grad_(True) for key, t in self._lora_of_groups(factors, groups).items()}
        # A graph of its own, kept by this tier: a checkpoint's saved-tensors hooks (active in a recompute) must not
        # take its tensors, which the first forward never saved.
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_keep_tensor, _keep_tensor):
            y = self._run(x_leaf, w_leaf, groups, weights, lora_groups,
                          {which: f.scaling for which, f in lora.items()})
        return plan, x_leaf, w_leaf, lora_groups, y

    def backward(self, x, ids, w, lora: ExpertLora, plan: TierPlan, dy):
        """dx and dw of the accelerator's slots, and ``lora_grads(into=None)``: their LoRA gradients (fp32, PEFT
        layout, on the host) added into the buffers ``into`` (once the CPU kernel has written them), or returned
        as new tensors. Unless the recompute recorded the forward, the weights are fetched again and the forward
        recomputed under autograd."""
        recorded, self._recorded = self._recorded, None
        try:
            if recorded is None or recorded[1].shape != x.shape or recorded[0] != plan:
                groups = self._groups(ids.to(self.device), plan)
                weights, factors, timer = self._weights(plan, True, lora)
                recorded = self._record(x, w, lora, plan, groups, weights, factors)
            else:
                timer = self._compute_timer()
            _, x_leaf, w_leaf, lora_groups, y = recorded
            with torch.enable_grad():
                grads = torch.autograd.grad(y, [x_leaf, w_leaf, *lora_groups.values()],
                                            dy.to(self.device, torch.float32), allow_unused=True)
        except torch.OutOfMemoryError:
            del recorded
            self._warn_out_of_memory("backward")
            return self._on_cpu(x, ids, w, lora, plan, dy)[1:]
        dx = torch.zeros_like(x_leaf) if grads[0] is None else grads[0]
        dw = torch.zeros_like(w_leaf) if grads[1] is None else grads[1]
        factors = {f"{which}_{name}": getattr(f, name) for which, f in lora.items() for name in "AB"}
        experts = self._group_experts(plan)
        lora_parts = {key: self._to_factor(self._peft_layout(key, grad, experts, factors[key]), factors[key])
                      for key, grad in zip(lora_groups, grads[2:])}
        copied = None
        if self.device.type == "cuda" and any(part.device.type == "cpu" for part in lora_parts.values()):
            copied = torch.cuda.Event()
            copied.record(torch.cuda.current_stream(self.device))
        self._window.parts["accelerator"].append((True, timer.stop()))

        def lora_grads(into: dict | None = None) -> dict:
            if copied is not None:
                copied.synchronize()
            return _add_into(into, lora_parts)

        return dx, dw, lora_grads


def _add_into(into: dict | None, grads: dict) -> dict:
    """``grads`` added into the same keys of ``into``, or ``grads`` where there is no ``into``; where ``into``'s are
    host buffers (the CPU kernel's, pinned) and ``grads`` are on the device, the sums are made there."""
    if into is None:
        return grads
    for key, grad in grads.items():
        if into[key].device == grad.device:
            into[key] += grad
        else:
            into[key] = grad.add_(into[key].to(grad.device, non_blocking=True))
    return into


def _runs(experts: tuple[int, ...]):
    """``(position, first expert, count)`` of each run of consecutive ids in the sorted ``experts``."""
    at = 0
    while at < len(experts):
        count = 1
        while at + count < len(experts) and experts[at + count] == experts[at] + count:
            count += 1
        yield at, experts[at], count
        at += count
