"""The C++ expert kernel against an fp32 PyTorch reference, on every ISA backend this CPU runs.

Tolerances (relative L2): 1e-5 with fp32 weights, 1e-2 with bf16 weights. Inputs are fresh random draws (seeded
from the test id plus a per-run random offset, printed on failure).
"""
import ctypes
import random

import pytest
import torch

from kt_patch.autograd import expert_forward
from kt_patch.kernel import (ExpertKernel, ExpertLora, LoraFactors, cached_activation_bytes, live_contexts,
                             release_cached_activations, supported_isas)
from moe_reference import gpt_oss_forward, limit_in_a_gap, random_batch, random_layer, reference_grads, rel_l2

ISAS = supported_isas()
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
RUN_SEED = random.randrange(1 << 20)


def seed(*parts):
    return (hash(parts) + RUN_SEED) % (1 << 31)


def lora_of(gate_up, down):
    """The typed LoRA value of ``(A, B, scaling)`` tuples (or None)."""
    return ExpertLora(*(None if f is None else LoraFactors(*f) for f in (gate_up, down)))


def run_kernel(kernel, x, ids, w, dy, lora_gu, lora_dn, grads=None):
    y, ctx = kernel.forward(x, ids, w, lora_of(lora_gu, lora_dn), save_for_backward=True)
    grads = ctx.new_lora_grads() if grads is None else grads
    dx, dw = kernel.backward(ctx, dy, grads)
    return {"y": y, "dx": dx, "dw": dw, **grads}


def assert_close(got, ref, tol, note=""):
    assert set(ref) <= set(got), f"missing outputs {set(ref) - set(got)}"
    errs = {n: rel_l2(got[n], ref[n]) for n in ref}
    bad = {n: e for n, e in errs.items() if not e <= tol}
    assert not bad, f"rel L2 above {tol} {note} (run seed {RUN_SEED}): {bad}; all: {errs}"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T,k,ranks", [(1, 8, (8, 8)), (7, 2, (0, 0)), (7, 8, (16, 8)), (513, 1, (8, 16)),
                                       (513, 8, (0, 8)), (64, 4, (40, 12))])
def test_matches_fp32_reference(isa, dtype, T, k, ranks):
    E, H, I = 16, 72, 40  # neither a multiple of 32; with T = 1 most experts get no token
    # (dw of a single slot is one dot product whose bf16 error is unbounded relative to it, hence k > 1 at T = 1)
    weights, lora_gu, lora_dn = random_layer(E, H, I, *ranks, dtype, seed("w", isa, T, k))
    x, ids, w, dy = random_batch(T, H, E, k, dtype, seed("x", isa, T, k))
    kernel = ExpertKernel(*weights, isa=isa, threads=2)
    got = run_kernel(kernel, x, ids, w, dy, lora_gu, lora_dn)
    assert got["y"].dtype == dtype and got["dx"].dtype == dtype
    assert_close(got, reference_grads(x, ids, w, dy, weights, lora_gu, lora_dn), TOL[dtype], f"{isa} T={T} k={k}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("E,H,I,T,k,ranks", [
    (8, 72, 40, 48, 4, (64, 8)),      # large ranks, padded to different widths (r1p 64, r2p 32 and the reverse)
    (8, 72, 40, 48, 4, (8, 64)),
    (8, 72, 40, 48, 4, (128, 16)),
    (8, 8, 40, 48, 3, (40, 12)),      # H below one panel and below both ranks
    (8, 72, 4, 48, 3, (12, 40)),      # I below one panel and below both ranks
    (4, 16, 200, 300, 2, (33, 65)),   # ranks above H; I over several column blocks with a tail; > 240 rows an expert
    (4, 200, 16, 300, 2, (65, 33)),   # the same with H and I swapped
    (40, 72, 40, 30, 2, (8, 4)),      # B factors over two tiles of rows and of experts; experts without tokens
    (12, 45, 21, 40, 3, (8, 4)),      # B factors in part tiles: 12 experts = 8 + 4, rows 45 = 16 + 16 + 8 + 5; odd H, I
])
def test_shapes_and_ranks_match_fp32_reference(isa, dtype, E, H, I, T, k, ranks):
    """Ranks far apart, ranks above H or I, H or I below one 16-column panel: every scratch, packed-operand and
    row-buffer size depends on these."""
    weights, lora_gu, lora_dn = random_layer(E, H, I, *ranks, dtype, seed("shape", isa, E, H, I, ranks))
    x, ids, w, dy = random_batch(T, H, E, k, dtype, seed("shapex", isa, E, H, I, ranks))
    got = run_kernel(ExpertKernel(*weights, isa=isa, threads=3), x, ids, w, dy, lora_gu, lora_dn)
    assert_close(got, reference_grads(x, ids, w, dy, weights, lora_gu, lora_dn), TOL[dtype], f"{isa} {H}x{I} {ranks}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("x_dtype,w_dtype,lora_dtype", [
    (torch.bfloat16, torch.float32, torch.float32), (torch.float32, torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16, torch.float32)],
    ids=["x_bf16-w_fp32", "x_fp32-w_bf16", "lora_bf16-w_fp32", "lora_fp32-w_bf16"])
def test_mixed_dtypes_match_fp32_reference(isa, x_dtype, w_dtype, lora_dtype):
    """Activations, expert weights and LoRA factors each in their own dtype: the gather and the packing convert."""
    E, H, I, T, k = 8, 40, 24, 37, 3
    weights, lora_gu, lora_dn = random_layer(E, H, I, 12, 40, w_dtype, seed("mixed", isa, x_dtype, w_dtype))
    lora_gu, lora_dn = ((A.to(lora_dtype), B.to(lora_dtype), s) for A, B, s in (lora_gu, lora_dn))
    x, ids, w, dy = random_batch(T, H, E, k, x_dtype, seed("mixedx", isa, x_dtype, w_dtype))
    got = run_kernel(ExpertKernel(*weights, isa=isa, threads=2), x, ids, w, dy, lora_gu, lora_dn)
    assert got["y"].dtype == x_dtype and got["dx"].dtype == x_dtype
    tol = TOL[torch.bfloat16 if torch.bfloat16 in (x_dtype, w_dtype) else torch.float32]  # bf16 LoRA values are exact
    assert_close(got, reference_grads(x, ids, w, dy, weights, lora_gu, lora_dn), tol, f"{isa}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("accumulate", [True, False], ids=["accumulate", "overwrite"])
def test_stale_executor_memory_is_never_read(isa, dtype, accumulate):
    """Layers with one thread count share their scratch. A larger layer run on NaN first leaves NaN in all of it
    (freshly mapped memory is zero, which hides reads of padding or rows a pass never wrote); the next layer's
    results must not see any of it, nor the stale gradient rows of its experts without tokens."""
    threads = 3

    def poison():
        weights, lora_gu, lora_dn = random_layer(8, 136, 168, 72, 72, dtype, 11)
        nan = lambda t: torch.full_like(t, float("nan"))
        kernel = ExpertKernel(*map(nan, weights), isa=isa, threads=threads)
        lora = lora_of(*((nan(A), nan(B), s) for A, B, s in (lora_gu, lora_dn)))
        x, ids, w, dy = random_batch(400, 136, 8, 4, dtype, 12)
        y, ctx = kernel.forward(nan(x), ids, w, lora, save_for_backward=True)
        kernel.backward(ctx, nan(dy), ctx.new_lora_grads())
        assert y.isnan().all()

    E, H, I, T, k = 8, 72, 40, 64, 4
    weights, lora_gu, lora_dn = random_layer(E, H, I, 40, 12, dtype, seed("stale", isa, dtype))
    x, ids, w, dy = random_batch(T, H, E - 3, k, dtype, seed("stalex", isa, dtype))  # the last 3 experts idle
    kernel = ExpertKernel(*weights, isa=isa, threads=threads)
    poison()
    y, ctx = kernel.forward(x, ids, w, lora_of(lora_gu, lora_dn), save_for_backward=True)
    poison()
    grads = ctx.new_lora_grads(zeroed=accumulate)
    dx, dw = kernel.backward(ctx, dy, grads, accumulate=accumulate)
    got = {"y": y, "dx": dx, "dw": dw, **grads}
    assert_close(got, reference_grads(x, ids, w, dy, weights, lora_gu, lora_dn), TOL[dtype], f"{isa}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T,k", [(5, 2), (300, 4)])  # one row block per expert, and several
def test_backward_weight_copy_matches_fp32_reference(isa, dtype, T, k):
    """backward_weights="copy" packs the transposed weights once; its backward reads them instead of transposing."""
    E, H, I = 8, 72, 40
    weights, lora_gu, lora_dn = random_layer(E, H, I, 8, 4, dtype, seed("copy", isa, dtype, T))
    x, ids, w, dy = random_batch(T, H, E, k, dtype, seed("copyx", isa, dtype, T))
    kernel = ExpertKernel(*weights, isa=isa, threads=3, backward_weights="copy")
    single = ExpertKernel(*weights, isa=isa, threads=3, backward_weights="transpose")
    assert kernel.weight_bytes == 2 * single.weight_bytes
    got = run_kernel(kernel, x, ids, w, dy, lora_gu, lora_dn)
    assert_close(got, reference_grads(x, ids, w, dy, weights, lora_gu, lora_dn), TOL[dtype], f"{isa} T={T}")


@pytest.mark.parametrize("isa", ISAS)
def test_results_do_not_depend_on_thread_count(isa):
    """Every work item is computed whole by one worker in a fixed order, so any thread count gives the same bits;
    a difference means items of one phase write memory another item reads or writes."""
    E, H, I, T, k = 8, 72, 40, 150, 4
    weights, lora_gu, lora_dn = random_layer(E, H, I, 40, 12, torch.bfloat16, seed("threads", isa))
    x, ids, w, dy = random_batch(T, H, E, k, torch.bfloat16, seed("threadsx", isa))
    one, many = (run_kernel(ExpertKernel(*weights, isa=isa, threads=n), x, ids, w, dy, lora_gu, lora_dn)
                 for n in (1, 5))
    assert [n for n in one if not torch.equal(one[n], many[n])] == []


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T,k", [(7, 2), (300, 4)])
def test_gpt_oss_experts_match_transformers_layout(isa, dtype, T, k):
    """Transposed, interleaved, biased experts with the clamped activation. In fp32 the limit is low enough that
    the clamps bind for many values (and lies in a gap between them); in bf16 it is GPT-OSS's 7, where they do not:
    a clamp is discontinuous, and bf16 rounding moves values across it, so a bound clamp has no bf16 error budget
    against an fp32 reference."""
    E, H, I, alpha = 8, 72, 44, 1.702  # gate_up's B: 88 interleaved rows, the last 8 of them 4 gate and 4 up
    (gate_up, down), lora_gu, lora_dn = random_layer(E, H, I, 8, 4, dtype, seed("gptoss", isa, T))
    gate_up, down = gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()  # [E,H,2I], [E,I,H]
    g = torch.Generator().manual_seed(seed("gptoss-bias", isa, T))
    biases = {"gate_up_bias": torch.randn(E, 2 * I, generator=g).to(dtype),
              "down_bias": (torch.randn(E, H, generator=g) * 0.1).to(dtype)}
    x, ids, w, dy = random_batch(T, H, E, k, dtype, seed("gptossx", isa, T))
    limit = limit_in_a_gap(x, ids, gate_up, biases["gate_up_bias"], lora_gu, 1.5) if dtype == torch.float32 else 7.0
    kernel = ExpertKernel(gate_up, down, isa=isa, threads=2, activation="gpt_oss_swiglu", alpha=alpha, limit=limit,
                          transposed=True, interleaved=True, **biases)
    got = run_kernel(kernel, x, ids, w, dy, lora_gu, lora_dn)
    ref = reference_grads(x, ids, w, dy, (gate_up, down), lora_gu, lora_dn, gpt_oss_forward, alpha=alpha,
                          limit=limit, **biases)
    assert_close(got, ref, TOL[dtype], f"gpt-oss {isa}")
    exported = kernel.export_weights()
    assert torch.equal(exported[0], gate_up) and torch.equal(exported[1], down)


@pytest.mark.parametrize("isa", ISAS)
def test_same_expert_twice_for_a_token_is_summed(isa):
    E, H, I, T, k = 4, 48, 32, 64, 4
    weights, lora_gu, lora_dn = random_layer(E, H, I, 4, 4, torch.float32, seed("dup", isa))
    x, ids, w, dy = random_batch(T, H, E, k, torch.float32, seed("dupx", isa), distinct=False)
    assert (ids.sort(dim=1).values.diff(dim=1) == 0).any(), "the draw must repeat an expert within a token"
    got = run_kernel(ExpertKernel(*weights, isa=isa, threads=2), x, ids, w, dy, lora_gu, lora_dn)
    assert_close(got, reference_grads(x, ids, w, dy, weights, lora_gu, lora_dn), 1e-5)


@pytest.mark.parametrize("isa", ISAS)
def test_empty_batch(isa):
    weights, lora_gu, lora_dn = random_layer(4, 32, 16, 4, 4, torch.bfloat16, 0)
    kernel = ExpertKernel(*weights, isa=isa, threads=2)
    x = torch.empty(0, 32, dtype=torch.bfloat16)
    y, ctx = kernel.forward(x, torch.empty(0, 2, dtype=torch.int64), torch.empty(0, 2), lora_of(lora_gu, lora_dn),
                            save_for_backward=True)
    grads = ctx.new_lora_grads()
    dx, dw = kernel.backward(ctx, torch.empty(0, 32, dtype=torch.bfloat16), grads)
    assert y.shape == (0, 32) and dx.shape == (0, 32) and dw.shape == (0, 2)
    assert all(float(g.abs().sum()) == 0 for g in grads.values())


@pytest.mark.parametrize("isa", ISAS)
def test_outputs_are_fully_written(isa):
    """Call the binding with NaN-poisoned outputs: every element must be overwritten."""
    E, H, I, T, k = 8, 40, 24, 37, 3
    weights, lora_gu, lora_dn = random_layer(E, H, I, 4, 4, torch.float32, seed("poison", isa))
    x, ids, w, dy = random_batch(T, H, E, k, torch.float32, seed("poisonx", isa))
    ids = ids.contiguous()
    kernel = ExpertKernel(*weights, isa=isa, threads=2)
    lora = lora_of(lora_gu, lora_dn)
    y = torch.full((T, H), float("nan"))
    handle = kernel._layer.submit_forward(T, k, x.data_ptr(), "f32", ids.data_ptr(), w.data_ptr(), y.data_ptr(),
                                          True, kernel._lora_arg(lora.gate_up), kernel._lora_arg(lora.down), None)
    ctx = handle.wait()
    dx, dw = torch.full((T, H), float("nan")), torch.full((T, k), float("nan"))
    grads = {n: torch.zeros_like(g) for n, g in zip(("a", "b", "c", "d"), (*lora_gu[:2], *lora_dn[:2]))}
    kernel._layer.submit_backward(ctx, dy.data_ptr(), dx.data_ptr(), dw.data_ptr(),
                                  *(g.data_ptr() for g in grads.values()), True, None).wait()
    ref = reference_grads(x, ids, w, dy, weights, lora_gu, lora_dn)
    assert_close({"y": y, "dx": dx, "dw": dw}, {n: ref[n] for n in ("y", "dx", "dw")}, 1e-5)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", [0, 3, 40])  # no tokens; most experts without tokens; a few without
def test_lora_grads_overwrite_poisoned_buffers(isa, dtype, T):
    """accumulate=False writes every element of the LoRA gradients: NaN-filled buffers (as torch.empty may hold)
    come back equal to the fp32 reference, zeros included for the experts no token chose."""
    E, H, I, k = 12, 72, 40, 2
    weights, lora_gu, lora_dn = random_layer(E, H, I, 8, 4, dtype, seed("overwrite", isa, dtype, T))
    x, ids, w, dy = random_batch(T, H, E - 3, k, dtype, seed("overwritex", isa, dtype, T))  # the last 3 idle
    kernel = ExpertKernel(*weights, isa=isa, threads=3)
    y, ctx = kernel.forward(x, ids, w, lora_of(lora_gu, lora_dn), save_for_backward=True)
    grads = {n: g.fill_(float("nan")) for n, g in ctx.new_lora_grads(zeroed=False).items()}
    dx, dw = kernel.backward(ctx, dy, grads, accumulate=False)
    idle = sorted(set(range(E)) - set(ids.flatten().tolist()))
    if T:
        ref = reference_grads(x, ids, w, dy, weights, lora_gu, lora_dn)
        assert_close({"y": y, "dx": dx, "dw": dw, **grads}, ref, TOL[dtype], f"{isa} T={T}")
    r_gu, r_dn = lora_gu[0].shape[0] // E, lora_dn[0].shape[0] // E
    for e in idle:  # exact zeros, not merely small
        assert not grads["gate_up_A"][e * r_gu:(e + 1) * r_gu].any() and not grads["down_A"][e * r_dn:(e + 1) * r_dn].any()
        assert not grads["gate_up_B"][:, e::E].any() and not grads["down_B"][:, e::E].any()


@pytest.mark.parametrize("isa", ISAS)
def test_gradient_accumulation_over_micro_batches(isa):
    E, H, I, k = 8, 48, 32, 2
    weights, lora_gu, lora_dn = random_layer(E, H, I, 4, 4, torch.float32, seed("acc", isa))
    kernel = ExpertKernel(*weights, isa=isa, threads=2)
    grads, expect = None, {}
    for step in range(3):
        x, ids, w, dy = random_batch(11 + step, H, E, k, torch.float32, seed("acc", isa, step))
        out = run_kernel(kernel, x, ids, w, dy, lora_gu, lora_dn, grads)
        grads = {n: out[n] for n in ("gate_up_A", "gate_up_B", "down_A", "down_B")}
        ref = reference_grads(x, ids, w, dy, weights, lora_gu, lora_dn)
        for n in grads:
            expect[n] = expect.get(n, 0) + ref[n]
    assert_close(grads, expect, 1e-5)


@pytest.mark.parametrize("isa", ISAS)
def test_lora_factors_changed_in_place_are_seen(isa):
    E, H, I, T, k = 8, 48, 32, 19, 2
    weights, lora_gu, lora_dn = random_layer(E, H, I, 4, 4, torch.float32, seed("inplace", isa))
    kernel = ExpertKernel(*weights, isa=isa, threads=2)
    x, ids, w, dy = random_batch(T, H, E, k, torch.float32, seed("inplacex", isa))
    lora = lora_of(lora_gu, lora_dn)
    y0, _ = kernel.forward(x, ids, w, lora)
    g = torch.Generator().manual_seed(seed("step", isa))
    for t in (*lora_gu[:2], *lora_dn[:2]):  # what an optimizer step does
        t.add_(torch.randn(t.shape, generator=g) * 0.05)
    y1, _ = kernel.forward(x, ids, w, lora)
    ref = reference_grads(x, ids, w, dy, weights, lora_gu, lora_dn)
    assert rel_l2(y1, ref["y"]) <= 1e-5
    assert rel_l2(y0, ref["y"]) > 1e-3


def test_concurrent_layers_in_flight():
    isa = ISAS[0]
    layers, batches = [], []
    for i in range(3):
        weights, lora_gu, lora_dn = random_layer(8, 40, 24, 4, 4, torch.float32, seed("conc", i))
        kernel = ExpertKernel(*weights, isa=isa, threads=2)
        layers.append((kernel, weights, lora_gu, lora_dn))
        batches.append(random_batch(29, 40, 8, 2, torch.float32, seed("concx", i)))
    pending = [k.submit_forward(x, ids, w, lora_of(gu, dn), True)
               for (k, _, gu, dn), (x, ids, w, _) in zip(layers, batches)]
    results = [p.wait() for p in pending]
    back = [k.submit_backward(ctx, b[3], ctx.new_lora_grads()) for (k, *_), (_, ctx), b in
            zip(layers, results, batches)]
    for (kernel, weights, lora_gu, lora_dn), (y, _), b, p in zip(layers, results, batches, back):
        dx, dw = p.wait()
        ref = reference_grads(*b, weights, lora_gu, lora_dn)
        assert_close({"y": y, "dx": dx, "dw": dw}, {n: ref[n] for n in ("y", "dx", "dw")}, 1e-5)


def test_autograd_node_gives_ordinary_grads():
    E, H, I, T, k = 8, 48, 32, 21, 2
    weights, lora_gu, lora_dn = random_layer(E, H, I, 4, 4, torch.float32, seed("autograd"))
    x, ids, w, dy = random_batch(T, H, E, k, torch.float32, seed("autogradx"))
    kernel = ExpertKernel(*weights, threads=2)
    params = [torch.nn.Parameter(t.clone()) for t in (*lora_gu[:2], *lora_dn[:2])]
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    for _ in range(2):  # two micro-batches accumulate into .grad like any parameter
        y = expert_forward(kernel, xr, ids, wr, lora_of((params[0], params[1], lora_gu[2]),
                                                        (params[2], params[3], lora_dn[2])))
        y.backward(dy)
    ref = reference_grads(x, ids, w, dy, weights, lora_gu, lora_dn)
    got = {"dx": xr.grad / 2, "dw": wr.grad / 2}
    got.update({n: p.grad / 2 for n, p in zip(("gate_up_A", "gate_up_B", "down_A", "down_B"), params)})
    assert_close(got, {n: ref[n] for n in got}, 1e-5)
    assert live_contexts() == 0


def test_contexts_are_freed():
    weights, lora_gu, lora_dn = random_layer(4, 32, 16, 4, 4, torch.float32, 1)
    kernel = ExpertKernel(*weights, threads=2)
    x, ids, w, _ = random_batch(9, 32, 4, 2, torch.float32, 2)
    before = live_contexts()
    _, ctx = kernel.forward(x, ids, w, lora_of(lora_gu, lora_dn), save_for_backward=True)
    assert live_contexts() == before + 1
    del ctx
    kernel.forward(x, ids, w)
    assert live_contexts() == before


def test_freed_activations_are_reused_then_released():
    """A freed context's activation buffers serve the next forward (no fresh pages per layer and step); the cache
    never holds more than the contexts alive at once, reused buffers hold stale NaN that must never be read, and
    release hands everything back."""
    E, H, I, k = 8, 72, 40, 4
    weights, lora_gu, lora_dn = random_layer(E, H, I, 8, 8, torch.bfloat16, seed("cache"))
    kernel = ExpertKernel(*weights, threads=6)  # a thread count no other test uses: an executor of its own
    release_cached_activations()
    assert cached_activation_bytes() == 0

    def nan_forward(T):  # leaves NaN in every activation buffer the context got
        x, ids, w, _ = random_batch(T, H, E, k, torch.bfloat16, seed("cachenan", T))
        return kernel.forward(torch.full_like(x, float("nan")), ids, w, lora_of(lora_gu, lora_dn),
                              save_for_backward=True)[1]

    small, large = nan_forward(200), nan_forward(300)
    del small
    del large  # freed last: the set the next forward takes
    two_sets = cached_activation_bytes()
    assert two_sets > 0
    for T in (250, 9):  # each takes a NaN-filled set, as large as or larger than it needs
        x, ids, w, dy = random_batch(T, H, E, k, torch.bfloat16, seed("cachex", T))
        got = run_kernel(kernel, x, ids, w, dy, lora_gu, lora_dn)
        assert_close(got, reference_grads(x, ids, w, dy, weights, lora_gu, lora_dn), TOL[torch.bfloat16], f"T={T}")
        assert cached_activation_bytes() == two_sets  # reused, not grown
    release_cached_activations()
    assert cached_activation_bytes() == 0


def test_export_weights_round_trip():
    weights, _, _ = random_layer(4, 40, 24, 0, 0, torch.bfloat16, 3)
    gate_up, down = ExpertKernel(*weights, threads=1).export_weights()
    assert torch.equal(gate_up, weights[0]) and torch.equal(down, weights[1])


def packed_as_logical(address, nbytes, dtype, experts, Np, Kp, pair):
    """W[E][Np][Kp] from a packed buffer read in place: the panel layout of plan.h is a regular tiling
    [E][Np/16][Kp/pair][16][pair], so a view and a permute undo it."""
    buf = (ctypes.c_char * nbytes).from_address(address)
    packed = torch.frombuffer(buf, dtype=dtype).view(experts, Np // 16, Kp // pair, 16, pair)
    return packed.permute(0, 1, 3, 2, 4).reshape(experts, Np, Kp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backward_weights", ["transpose", "copy"])
def test_packed_weights_rebuild_the_weights(dtype, backward_weights):
    """The streamed accelerator tier copies the packed buffers as they lie and recovers W[N][K] with a permute:
    every expert's gate, up and down come back exactly, and the padding is zeros; ExpertKernel.packed_weights()
    views the same buffers and its unpack() gives back the weights of any rows (on the device they are on)."""
    E, H, I = 3, 72, 40  # neither a multiple of 32: padded on both sides
    (gate_up, down), _, _ = random_layer(E, H, I, 0, 0, dtype, seed("packed", dtype))
    kernel = ExpertKernel(gate_up, down, threads=2, backward_weights=backward_weights)
    layout, buffers = kernel._layer.packed_layout(), kernel._layer.packed_weights()
    pair = 2 if dtype == torch.bfloat16 else 1
    assert layout == {"dtype": {torch.bfloat16: "bf16", torch.float32: "f32"}[dtype], "panel": 16, "pair": pair,
                      "Hp": 96, "Ip": 64, "gate_up_stride": 64 * 96, "down_stride": 96 * 64}
    expected = {"gate": gate_up[:, :I], "up": gate_up[:, I:], "down": down}
    for name, (address, nbytes) in buffers.items():
        N, K = expected[name].shape[1:]
        Np, Kp = (layout["Hp"], layout["Ip"]) if name == "down" else (layout["Ip"], layout["Hp"])
        stride = layout["down_stride" if name == "down" else "gate_up_stride"]
        assert nbytes == E * stride * dtype.itemsize and stride == Np * Kp
        W = packed_as_logical(address, nbytes, dtype, E, Np, Kp, layout["pair"])
        assert torch.equal(W[:, :N, :K], expected[name]), name
        assert not W[:, N:].any() and not W[:, :, K:].any(), f"{name}: padding is not zero"
    packed = kernel.packed_weights()
    assert {name: (t.data_ptr(), t.numel() * t.element_size()) for name, t in packed.items()} == buffers
    experts = torch.tensor([2, 0])
    for name, W in expected.items():
        assert torch.equal(kernel.unpack(packed[name][experts], name), W[experts]), name


# ------------------------------------------------------------------------------------------------ bad input
@pytest.fixture
def kernel():
    weights, _, _ = random_layer(4, 32, 16, 0, 0, torch.float32, 4)
    return ExpertKernel(*weights, name="layers.0.mlp", threads=1)


def test_expert_id_out_of_range_names_layer_and_token(kernel):
    x, ids, w, _ = random_batch(5, 32, 4, 2, torch.float32, 5)
    ids[3, 1] = 4
    with pytest.raises(ValueError, match=r"layers\.0\.mlp: expert id 4 at token 3, slot 1 is out of range \[0, 4\)"):
        kernel.forward(x, ids, w)
    ids[3, 1] = -2  # -1 is a skipped slot
    with pytest.raises(ValueError, match="expert id -2"):
        kernel.forward(x, ids, w)


@pytest.mark.parametrize("change,message", [
    (lambda x, ids, w: (x[:, :16], ids, w), r"x must be \[T, 32\]"),
    (lambda x, ids, w: (x.half(), ids, w), "x must be a bfloat16/float32 CPU tensor"),
    (lambda x, ids, w: (torch.randn(32, 5).T, ids, w), "x must be contiguous"),
    (lambda x, ids, w: (x, ids[:, :1], w), "topk_ids and topk_weights must both be"),
    (lambda x, ids, w: (x, ids.float(), w), "topk_ids must be an integer tensor"),
])
def test_bad_inputs_raise_clear_errors(kernel, change, message):
    x, ids, w, _ = random_batch(5, 32, 4, 2, torch.float32, 6)
    with pytest.raises(ValueError, match=message):
        kernel.forward(*change(x, ids, w))


def test_bad_weights_and_lora_raise(kernel):
    with pytest.raises(ValueError, match=r"expected gate_up_proj and down_proj \[E, 2I, H\] and \[E, H, I\]"):
        ExpertKernel(torch.randn(4, 31, 8), torch.randn(4, 8, 15))
    with pytest.raises(ValueError, match="bfloat16 or float32"):
        ExpertKernel(torch.randn(4, 32, 8).half(), torch.randn(4, 8, 16).half())
    x, ids, w, _ = random_batch(5, 32, 4, 2, torch.float32, 6)
    with pytest.raises(ValueError, match=r"down LoRA factors must be A \[E\*r, 16\]"):
        kernel.forward(x, ids, w, lora_of(None, (torch.randn(8, 15), torch.randn(32, 8), 1.0)))


def test_backward_needs_a_saved_forward(kernel):
    x, ids, w, dy = random_batch(5, 32, 4, 2, torch.float32, 7)
    _, ctx = kernel.forward(x, ids, w, save_for_backward=False)
    assert ctx is None
    with pytest.raises(ValueError, match="save_for_backward=True"):
        kernel.backward(ctx, dy)
    lora = lora_of(*random_layer(4, 32, 16, 4, 4, torch.float32, 7)[1:])
    _, ctx = kernel.forward(x, ids, w, lora, save_for_backward=True)
    with pytest.raises(ValueError, match=r"lora_grads\['gate_up_A'\]"):
        kernel.backward(ctx, dy, {})


def test_unknown_backward_weights_is_an_error():
    weights, _, _ = random_layer(4, 32, 16, 0, 0, torch.float32, 5)
    for bad in ("twice", ""):
        with pytest.raises(ValueError, match=f"backward_weights must be one of transpose, copy; got '{bad}'"):
            ExpertKernel(*weights, isa="scalar", threads=1, backward_weights=bad)


def test_unknown_or_unavailable_isa_is_an_error():
    weights, _, _ = random_layer(2, 16, 16, 0, 0, torch.float32, 8)
    with pytest.raises(ValueError, match="ISA 'sse9' is not available on this CPU; available: auto"):
        ExpertKernel(*weights, isa="sse9", threads=1)


def test_kernel_reads_no_environment(monkeypatch):
    """Options are resolved once, by kt_patch.enable(), and handed down: a kernel built directly takes only its
    arguments."""
    weights, _, _ = random_layer(2, 16, 16, 0, 0, torch.float32, 9)
    monkeypatch.setenv("KT_ISA", "scalar")
    monkeypatch.setenv("KT_BACKWARD_WEIGHTS", "copy")
    kernel = ExpertKernel(*weights, threads=1)
    assert kernel.isa == ISAS[0] and kernel.backward_weights == "transpose"
    assert ExpertKernel(*weights, isa="scalar", threads=1).isa == "scalar"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_skipped_slots_are_left_to_another_tier(isa, dtype):
    """Slots with expert id -1 (computed by another executor tier) get no row: y and the LoRA gradients are those of
    the other slots alone, their dw is 0, and the outputs are still fully written (NaN-poisoned dw)."""
    E, H, I, T, k = 8, 72, 40, 45, 4
    weights, lora_gu, lora_dn = random_layer(E, H, I, 8, 4, dtype, seed("skip", isa, dtype))
    x, ids, w, dy = random_batch(T, H, E, k, dtype, seed("skipx", isa, dtype))
    g = torch.Generator().manual_seed(seed("skipmask", isa, dtype))
    skipped = torch.rand(T, k, generator=g) < 0.4
    skipped[0] = True  # a token with every slot elsewhere
    kernel = ExpertKernel(*weights, isa=isa, threads=2)
    y, ctx = kernel.forward(x, ids.masked_fill(skipped, -1), w, lora_of(lora_gu, lora_dn), save_for_backward=True)
    grads = {n: t.fill_(float("nan")) for n, t in ctx.new_lora_grads(zeroed=False).items()}
    dx, dw = kernel.backward(ctx, dy, grads, accumulate=False)
    ref = reference_grads(x, ids, w.masked_fill(skipped, 0.0), dy, weights, lora_gu, lora_dn)
    assert torch.equal(dw[skipped], torch.zeros(int(skipped.sum())))
    ref["dw"] = ref["dw"].masked_fill(skipped, 0.0)
    assert_close({"y": y, "dx": dx, "dw": dw, **grads}, ref, TOL[dtype], f"{isa}")
    assert float(y[0].abs().sum()) == 0


def test_a_job_reports_the_seconds_its_workers_ran():
    """``run_seconds`` (what the executor's planner measures the CPU by): the workers' time on the job, within the
    caller's wall time around submit and wait, and more for more work."""
    import time

    weights, _, _ = random_layer(8, 256, 128, 0, 0, torch.float32, seed("jobtime"))
    kernel = ExpertKernel(*weights, threads=2)
    seconds = {}
    for T in (16, 2048):
        x, ids, w, _ = random_batch(T, 256, 8, 2, torch.float32, seed("jobtime", T))
        kernel.forward(x, ids, w)  # scratch grown
        started = time.perf_counter()
        pending = kernel.submit_forward(x, ids, w)
        pending.wait()
        wall = time.perf_counter() - started
        seconds[T] = pending.run_seconds
        assert 0 < seconds[T] <= wall
    assert seconds[2048] > seconds[16]
