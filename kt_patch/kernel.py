"""The Python entry point over the C++ expert kernel: torch CPU tensors in and out.

One :class:`ExpertKernel` holds one MoE layer's routed experts (frozen, packed for the chosen ISA backend) and runs
their forward and backward, LoRA on the experts included. The LoRA factors of a call are one :class:`ExpertLora`
value in the layout PEFT's ``ParamWrapper`` uses on fused experts; the kernel reads them in place at that call, so
optimizer updates are seen without any copy::

    kernel = ExpertKernel(experts.gate_up_proj, experts.down_proj, name="layers.3.mlp")
    lora = ExpertLora(gate_up=LoraFactors(A_gu, B_gu, scaling), down=LoraFactors(A_d, B_d, scaling))
    y, ctx = kernel.forward(x, topk_ids, topk_weights, lora, save_for_backward=True)
    dx, dw = kernel.backward(ctx, dy, lora_grads)      # lora_grads: fp32 buffers, added into

``submit_forward`` / ``submit_backward`` return at once; ``.wait()`` on the result blocks (without the GIL and
without spinning) until the CPU is done, so the caller can keep the GPU busy meanwhile.
"""
from __future__ import annotations

import ctypes
import dataclasses
from typing import Optional

import torch

from . import _C
from .machine import physical_cores_available
from .shared_weights import segment_name

ACTIVATIONS = ("swiglu", "gpt_oss_swiglu")  # silu(gate) * up; GPT-OSS's clamped (up + 1) * gate * sigmoid(alpha gate)
_BACKWARD_COPY = {"transpose": False, "copy": True}  # backward_weights -> the kernel keeps a backward copy
_DTYPES = {torch.bfloat16: "bf16", torch.float32: "f32"}


def supported_isas() -> list[str]:
    """ISA backends this CPU runs, best first."""
    return list(_C.supported_isas())


def live_contexts() -> int:
    """Forward contexts (activation caches kept for a backward) alive in the process."""
    return int(_C.live_contexts())


def cached_activation_bytes() -> int:
    """Bytes of freed activation caches the kernel keeps for the next forwards (at most one training step's peak)."""
    return int(_C.cached_activation_bytes())


def release_cached_activations() -> None:
    """Hand the kept activation caches back to the system (the next forwards allocate afresh)."""
    _C.release_cached_activations()


def _gate_then_up(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Interleaved (gate, up, gate, up, ...) along dim -> all gates, then all ups."""
    pairs = t.unflatten(dim, (-1, 2))
    return torch.cat((pairs.select(dim + 1, 0), pairs.select(dim + 1, 1)), dim)


@dataclasses.dataclass(frozen=True)
class LoraFactors:
    """The factors of one PEFT ``ParamWrapper`` on fused experts, read in place by the kernel.

    ``A`` [E*r, in] (expert-major rows), ``B`` [out, E*r] (rank-major columns: column ``j*E + e``), contiguous
    bfloat16 or float32 tensors of one dtype, in host memory where the kernel reads them; ``scaling`` as PEFT
    computes it (``lora_alpha / r``, or rsLoRA's).
    """

    A: torch.Tensor
    B: torch.Tensor
    scaling: float


@dataclasses.dataclass(frozen=True)
class ExpertLora:
    """The expert LoRA of one call: factors on the fused ``gate_up`` and on ``down`` projections, either optional."""

    gate_up: Optional[LoraFactors] = None
    down: Optional[LoraFactors] = None

    def items(self):
        """``(projection, factors)`` for each projection that has LoRA, gate_up first."""
        return [(name, f) for name, f in (("gate_up", self.gate_up), ("down", self.down)) if f is not None]

    def tensors(self) -> list[torch.Tensor]:
        """Every factor tensor, in :meth:`items` order, A before B."""
        return [t for _, f in self.items() for t in (f.A, f.B)]

    def on_host(self, non_blocking: bool = False) -> "ExpertLora":
        """These factors in host memory, as the kernel reads them: themselves, or copies of factors on a device or in
        a dtype the kernel does not take (fp16 factors as fp32). ``non_blocking``: the copies of factors on a device
        are pinned and queued on the current stream; the caller waits for it before the kernel reads them."""
        if all(t.device.type == "cpu" and t.dtype in _DTYPES for t in self.tensors()):
            return self

        def host(t: torch.Tensor) -> torch.Tensor:
            dtype = t.dtype if t.dtype in _DTYPES else torch.float32
            if non_blocking and t.device.type != "cpu":
                return torch.empty(t.shape, dtype=dtype, pin_memory=True).copy_(t.detach(), non_blocking=True)
            return t.detach().to("cpu", dtype).contiguous()

        return ExpertLora(**{name: LoraFactors(host(f.A), host(f.B), f.scaling) for name, f in self.items()})


NO_LORA = ExpertLora()


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """Everything an :class:`ExpertKernel` is built from besides its weights, so it can be rebuilt with new ones.

    ``isa``: ``auto`` or a backend name (:func:`supported_isas`); ``threads``: pool threads (None: the physical cores
    available). GPT-OSS stores its experts ``transposed`` (gate_up [E, H, 2I], down [E, I, H], applied as
    ``x @ W``) with gate and up ``interleaved`` along 2I and uses ``activation="gpt_oss_swiglu"`` with its
    ``alpha`` and ``limit``; LoRA factors then follow that layout too. ``backward_weights="copy"`` keeps a second
    copy of the weights packed for the backward (twice the memory, no transposing in the backward); ``"transpose"``
    transposes the forward's copy as the backward runs.

    ``shared_weights``: the name of a POSIX shared-memory segment holding the packed weights for the
    ``local_world_size`` processes of this host (:mod:`kt_patch.shared_weights`): ``local_rank`` 0 creates and packs
    it, the others wait for it (at most ``peer_timeout`` seconds) and map it read-only. None: this process's own copy.
    """

    name: str = "moe"
    isa: str = "auto"
    threads: Optional[int] = None
    activation: str = "swiglu"
    alpha: float = 1.702
    limit: float = 7.0
    transposed: bool = False
    interleaved: bool = False
    backward_weights: str = "transpose"
    shared_weights: Optional[str] = None
    local_rank: int = 0
    local_world_size: int = 1
    peer_timeout: float = 1800.0

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"{self.name}: activation must be one of {', '.join(ACTIVATIONS)}; got "
                             f"{self.activation!r}")
        if self.backward_weights not in _BACKWARD_COPY:
            raise ValueError(f"{self.name}: backward_weights must be one of {', '.join(_BACKWARD_COPY)}; got "
                             f"{self.backward_weights!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ValueError(f"{self.name}: threads must be an integer >= 1 (or None); got {self.threads!r}")
        if self.shared_weights is not None and (not 0 <= self.local_rank < self.local_world_size
                                                or not self.peer_timeout > 0):
            raise ValueError(f"{self.name}: shared weights need 0 <= local_rank < local_world_size and "
                             f"peer_timeout > 0; got {self.local_rank}, {self.local_world_size}, {self.peer_timeout}")


class _Pending:
    """A submitted kernel call (its handle keeps the call's tensors alive until the job is done)."""

    def __init__(self, handle, result):
        self._handle, self._result = handle, result

    def wait(self):
        return self._result(self._handle.wait())

    @property
    def run_seconds(self) -> float:
        """Seconds the kernel's workers spent on the call (not queued behind another), once ``wait()`` returned."""
        return self._handle.run_seconds


class ExpertKernel:
    """The routed experts of one MoE layer in the C++ kernel.

    ``gate_up_proj`` [E, 2I, H] (gate rows first) and ``down_proj`` [E, H, I] are the transformers 5.x fused expert
    weights, bf16 (fast path) or fp32 (exact path); ``gate_up_bias`` [E, 2I] and ``down_bias`` [E, H] are optional
    (GPT-OSS). They are copied into kernel memory; the caller may free them. The keyword arguments are the fields of
    :class:`KernelSpec`, kept as ``kernel.spec``.
    """

    def __init__(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, *,
                 gate_up_bias: Optional[torch.Tensor] = None, down_bias: Optional[torch.Tensor] = None, **spec):
        self.spec = spec = KernelSpec(**spec)
        name = spec.name
        if gate_up_proj.dim() != 3 or down_proj.dim() != 3:
            raise ValueError(f"{name}: expert weights must be 3-D, got gate_up_proj {tuple(gate_up_proj.shape)} "
                             f"and down_proj {tuple(down_proj.shape)}")
        gu, dn = gate_up_proj.detach().to("cpu"), down_proj.detach().to("cpu")
        if spec.transposed:
            gu, dn = gu.transpose(1, 2), dn.transpose(1, 2)
        E, two_i, H = gu.shape
        if two_i % 2 or dn.shape != (E, H, two_i // 2):
            layout = "[E, H, 2I] and [E, I, H]" if spec.transposed else "[E, 2I, H] and [E, H, I]"
            raise ValueError(f"{name}: expected gate_up_proj and down_proj {layout}, got "
                             f"{tuple(gate_up_proj.shape)} and {tuple(down_proj.shape)}")
        if gate_up_proj.dtype != down_proj.dtype or gate_up_proj.dtype not in _DTYPES:
            raise ValueError(f"{name}: expert weights must both be bfloat16 or float32, got {gate_up_proj.dtype} "
                             f"and {down_proj.dtype}")
        for bias, shape, what in ((gate_up_bias, (E, two_i), "gate_up_bias"), (down_bias, (E, H), "down_bias")):
            if bias is not None and tuple(bias.shape) != shape:
                raise ValueError(f"{name}: {what} must be {list(shape)}, got {tuple(bias.shape)}")
        self.name = name
        self.num_experts, self.hidden_size, self.intermediate_size = E, H, two_i // 2
        self.dtype = gate_up_proj.dtype
        self.backward_weights = spec.backward_weights
        gu = _gate_then_up(gu, 1) if spec.interleaved else gu
        gu_bias = None if gate_up_bias is None else gate_up_bias.detach().to("cpu", torch.float32)
        gu_bias = _gate_then_up(gu_bias, 1) if spec.interleaved and gu_bias is not None else gu_bias
        biases = [None if b is None else b.contiguous() for b in
                  (gu_bias, None if down_bias is None else down_bias.detach().to("cpu", torch.float32))]
        gu, dn = gu.contiguous(), dn.contiguous()
        threads = spec.threads if spec.threads is not None else physical_cores_available()
        self._layer = _C.MoELayer(name, E, H, self.intermediate_size, gu.data_ptr(), dn.data_ptr(),
                                  _DTYPES[self.dtype], spec.isa, threads, spec.activation,
                                  float(spec.alpha), float(spec.limit),
                                  *(0 if b is None else b.data_ptr() for b in biases),
                                  bool(spec.interleaved), _BACKWARD_COPY[spec.backward_weights],
                                  spec.shared_weights or "", spec.local_rank == 0, spec.local_world_size,
                                  float(spec.peer_timeout))

    def rebuild(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, *,
                gate_up_bias: Optional[torch.Tensor] = None, down_bias: Optional[torch.Tensor] = None
                ) -> "ExpertKernel":
        """A new kernel from the same spec with other weights (given in this kernel's layout and dtype)."""
        spec = dataclasses.asdict(self.spec)
        if spec["shared_weights"] is not None:  # a segment of its own: the local ranks may still map the old one
            spec["shared_weights"] = segment_name(self.spec.name)
        return ExpertKernel(gate_up_proj.detach().to("cpu", self.dtype), down_proj.detach().to("cpu", self.dtype),
                            gate_up_bias=gate_up_bias, down_bias=down_bias, **spec)

    def host_tokens(self, tokens: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``tokens`` as this kernel takes them: a contiguous CPU tensor, in ``dtype``, else in their own dtype if
        bfloat16 or float32, else in the kernel's (fp16 activations, say). From an accelerator they land in pinned
        memory (a faster copy), and so do the kernel's outputs for them, which then go back without blocking."""
        dtype = dtype or (tokens.dtype if tokens.dtype in _DTYPES else self.dtype)
        if tokens.device.type == "cuda":
            return torch.empty(tokens.shape, dtype=dtype, pin_memory=True).copy_(tokens.detach())
        return tokens.detach().to("cpu", dtype).contiguous()

    @property
    def isa(self) -> str:
        return self._layer.isa

    @property
    def threads(self) -> int:
        return self._layer.threads

    @property
    def shared_name(self) -> str:
        """The ``/dev/shm`` segment (name) the packed weights live in, shared by the local ranks; '' if none."""
        return self._layer.shared_name

    @property
    def weights_read_only(self) -> bool:
        """Whether the packed weights are local rank 0's segment, mapped read-only here."""
        return self._layer.weights_read_only

    @property
    def weight_bytes(self) -> int:
        """Host memory of the packed weights (both copies with ``backward_weights="copy"``)."""
        return self._layer.weight_bytes

    def packed_weights(self) -> dict[str, torch.Tensor]:
        """The forward's packed weights in place (no copy): ``gate``, ``up`` [E, Ip*Hp] and ``down`` [E, Hp*Ip] in the
        kernel's dtype, valid while this kernel lives. :func:`unpack` turns rows of them back into ``W[N][K]``."""
        out = {}
        for name, (address, nbytes) in self._layer.packed_weights().items():
            storage = (ctypes.c_uint8 * nbytes).from_address(address)
            out[name] = torch.frombuffer(storage, dtype=self.dtype).view(self.num_experts, -1)
        return out

    def unpack(self, rows: torch.Tensor, matrix: str) -> torch.Tensor:
        """``W[n, N, K]`` (gate/up: [n, I, H]; down: [n, H, I]) from rows of :meth:`packed_weights` (on any device).

        The packed layout (csrc/plan.h) stores element (n, k) at ``((n/16)*(Kp/P) + k/P)*16*P + (n%16)*P + k%P``: a
        view [N/16, Kp/P, 16, P] whose middle axes swap."""
        layout = self._layer.packed_layout()
        Hp, Ip, panel, pair = layout["Hp"], layout["Ip"], layout["panel"], layout["pair"]
        (Np, Kp), (N, K) = ((Ip, Hp), (self.intermediate_size, self.hidden_size)) if matrix != "down" else \
            ((Hp, Ip), (self.hidden_size, self.intermediate_size))
        tiles = rows.view(-1, Np // panel, Kp // pair, panel, pair).permute(0, 1, 3, 2, 4)
        return tiles.reshape(-1, Np, Kp)[:, :N, :K]

    def export_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen weights back in the layout they were given in (for saving a base checkpoint)."""
        E, H, I = self.num_experts, self.hidden_size, self.intermediate_size
        gate_up = torch.empty(E, 2 * I, H, dtype=self.dtype)
        down = torch.empty(E, H, I, dtype=self.dtype)
        self._layer.export_weights(gate_up.data_ptr(), down.data_ptr())
        if self.spec.interleaved:
            gate_up = torch.stack((gate_up[:, :I], gate_up[:, I:]), dim=2).reshape(E, 2 * I, H)
        if self.spec.transposed:
            gate_up, down = gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()
        return gate_up, down

    # ------------------------------------------------------------------------------------------------ LoRA
    def _check_lora(self, lora: ExpertLora) -> None:
        if not isinstance(lora, ExpertLora):
            raise TypeError(f"{self.name}: lora must be an ExpertLora, got {type(lora).__name__}")
        E, H, I = self.num_experts, self.hidden_size, self.intermediate_size
        shapes = {"gate_up": (H, 2 * I), "down": (I, H)}
        for which, factors in lora.items():
            A, B = factors.A, factors.B
            in_features, out_features = shapes[which]
            rank = A.shape[0] // E if A.dim() == 2 else -1
            if (A.dim() != 2 or B.dim() != 2 or A.shape[0] % E or rank < 1 or A.shape[1] != in_features
                    or tuple(B.shape) != (out_features, rank * E)):
                raise ValueError(f"{self.name}: {which} LoRA factors must be A [E*r, {in_features}] and "
                                 f"B [{out_features}, E*r] with E={E}; got A {tuple(A.shape)} and B {tuple(B.shape)}")
            for t, n in ((A, "A"), (B, "B")):
                if t.device.type != "cpu" or t.dtype not in _DTYPES or not t.is_contiguous():
                    raise ValueError(f"{self.name}: {which} LoRA factor {n} must be a contiguous bfloat16/float32 "
                                     f"CPU tensor, got {t.dtype} on {t.device}, contiguous={t.is_contiguous()}")
            if A.dtype != B.dtype:
                raise ValueError(f"{self.name}: {which} LoRA factors differ in dtype ({A.dtype} vs {B.dtype})")

    def _lora_arg(self, factors: Optional[LoraFactors]):
        if factors is None:
            return None
        return _C.LoraFactors(factors.A.data_ptr(), factors.B.data_ptr(), _DTYPES[factors.A.dtype],
                              factors.A.shape[0] // self.num_experts, float(factors.scaling))

    # ------------------------------------------------------------------------------------------------ compute
    def _check_tokens(self, x, what="x"):
        if x.dim() != 2 or x.shape[1] != self.hidden_size:
            raise ValueError(f"{self.name}: {what} must be [T, {self.hidden_size}], got {tuple(x.shape)}")
        if x.device.type != "cpu" or x.dtype not in _DTYPES:
            raise ValueError(f"{self.name}: {what} must be a bfloat16/float32 CPU tensor, got {x.dtype} on {x.device}")
        if not x.is_contiguous():
            raise ValueError(f"{self.name}: {what} must be contiguous")

    def submit_forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                       lora: ExpertLora = NO_LORA, save_for_backward: bool = False) -> _Pending:
        """Start the forward; ``.wait()`` returns ``(y, ctx)`` (ctx is None unless save_for_backward)."""
        self._check_tokens(x)
        self._check_lora(lora)
        T = x.shape[0]
        if topk_ids.dim() != 2 or topk_ids.shape[0] != T or topk_weights.shape != topk_ids.shape:
            raise ValueError(f"{self.name}: topk_ids and topk_weights must both be [T={T}, k], got "
                             f"{tuple(topk_ids.shape)} and {tuple(topk_weights.shape)}")
        if topk_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"{self.name}: topk_ids must be an integer tensor, got {topk_ids.dtype}")
        if not topk_weights.is_floating_point():
            raise ValueError(f"{self.name}: topk_weights must be floating point, got {topk_weights.dtype}")
        ids = topk_ids.to("cpu", torch.int64).contiguous()
        weights = topk_weights.detach().to("cpu", torch.float32).contiguous()
        y = _empty_host_like(x)
        factors = _factor_storage(lora)  # the memory whose pointers the job (and the backward) reads
        keep = (x, ids, weights, y, factors)
        handle = self._layer.submit_forward(T, ids.shape[1], x.data_ptr(), _DTYPES[x.dtype], ids.data_ptr(),
                                            weights.data_ptr(), y.data_ptr(), bool(save_for_backward),
                                            self._lora_arg(lora.gate_up), self._lora_arg(lora.down), keep)
        return _Pending(handle, lambda ctx: (y, _Context(ctx, x.dtype, lora, factors) if ctx is not None else None))

    def forward(self, x, topk_ids, topk_weights, lora: ExpertLora = NO_LORA, save_for_backward: bool = False):
        return self.submit_forward(x, topk_ids, topk_weights, lora, save_for_backward).wait()

    def submit_backward(self, ctx: "_Context", dy: torch.Tensor, lora_grads: Optional[dict] = None,
                        accumulate: bool = True) -> _Pending:
        """Start the backward of a saved forward; ``.wait()`` returns ``(dx, dw)``. LoRA grads are added into
        ``lora_grads`` (fp32, PEFT layout, keys ``gate_up_A/B``, ``down_A/B`` for each LoRA the forward used), or
        with ``accumulate=False`` written over them whole (they may then come from ``new_lora_grads(zeroed=False)``).
        """
        if not isinstance(ctx, _Context):
            raise ValueError(f"{self.name}: backward needs the context of a forward run with save_for_backward=True")
        self._check_tokens(dy, "dy")
        if dy.shape[0] != ctx.tokens or dy.dtype != ctx.dtype:
            raise ValueError(f"{self.name}: dy must be [{ctx.tokens}, {self.hidden_size}] {ctx.dtype} like the "
                             f"forward's x, got {tuple(dy.shape)} {dy.dtype}")
        lora_grads = lora_grads or {}
        used = dict(ctx.lora.items())
        pointers = []
        for which in ("gate_up", "down"):
            for part in ("A", "B"):
                if which not in used:
                    pointers.append(0)
                    continue
                key, ref = f"{which}_{part}", getattr(used[which], part)
                grad = lora_grads.get(key)
                if grad is None or grad.dtype != torch.float32 or grad.shape != ref.shape \
                        or not grad.is_contiguous() or grad.device.type != "cpu":
                    raise ValueError(f"{self.name}: lora_grads[{key!r}] must be a contiguous fp32 CPU tensor of "
                                     f"shape {tuple(ref.shape)}")
                pointers.append(grad.data_ptr())
        dx = _empty_host_like(dy)
        dw = torch.empty(ctx.tokens, ctx.top_k, dtype=torch.float32, pin_memory=dy.is_pinned())
        handle = self._layer.submit_backward(ctx.handle, dy.data_ptr(), dx.data_ptr(), dw.data_ptr(), *pointers,
                                             accumulate=bool(accumulate), keep=(ctx, dy, dx, dw, lora_grads))
        return _Pending(handle, lambda _: (dx, dw))

    def backward(self, ctx, dy, lora_grads=None, accumulate=True):
        return self.submit_backward(ctx, dy, lora_grads, accumulate).wait()


def _factor_storage(lora: ExpertLora) -> tuple:
    """Views of the LoRA factors' current memory, which a job reads through raw pointers: kept alive with the job
    even if a parameter's values are moved meanwhile (``param.data = ...`` frees the old memory)."""
    return tuple(t.detach() for t in lora.tensors())


def _empty_host_like(tensor: torch.Tensor) -> torch.Tensor:
    """An output buffer for a kernel input: pinned like it, so that it goes to an accelerator without blocking."""
    return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_pinned())


class _Context:
    """What a forward kept for its backward (activations live in C++ until this object is freed)."""

    def __init__(self, handle, dtype, lora: ExpertLora, factors: tuple):
        self.handle, self.dtype, self.lora = handle, dtype, lora
        self._factors = factors  # the memory the forward read them from (_factor_storage at submit): the backward's
        self.tokens, self.top_k = handle.tokens, handle.top_k

    def new_lora_grads(self, zeroed: bool = True, pinned: bool = False) -> dict:
        """fp32 gradient buffers (PEFT layout) for the LoRA factors this forward used: zeroed, or uninitialised for
        a backward with ``accumulate=False``; ``pinned`` for gradients that go on to an accelerator."""
        new = torch.zeros if zeroed else torch.empty
        grads = {}
        for which, factors in self.lora.items():
            grads[f"{which}_A"] = new(factors.A.shape, dtype=torch.float32, pin_memory=pinned)
            grads[f"{which}_B"] = new(factors.B.shape, dtype=torch.float32, pin_memory=pinned)
        return grads
