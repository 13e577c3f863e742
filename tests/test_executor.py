"""The executor tiers: the accelerator's torch code (here on the CPU device) and the CPU kernel split one layer's
experts, and every output and gradient equals the CPU-only path.

Tolerances (relative L2): 1e-5 in fp32, 1e-2 in bf16 (the accelerator's bf16 matmuls beside the kernel's). Inputs are
fresh random draws (seeded from the test id plus a per-run offset, printed on failure).
"""
import gc
import random
import types

import pytest
import torch

import kt_patch
import tiny_models
from kt_patch.autograd import expert_forward
from kt_patch.executor import AcceleratorTier, GpuExpertBudget, SharedRates, _Cost, layer_bytes
from kt_patch.kernel import ExpertKernel, ExpertLora, LoraFactors
from kt_patch.layer import KtMoeLayer
from kt_patch.options import OptionError, resolve
from kt_patch.patcher import patch_model
from moe_reference import limit_in_a_gap, random_batch, random_layer, rel_l2

RUN_SEED = random.randrange(1 << 20)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
CPU = torch.device("cpu")


def seed(*parts):
    return (hash(parts) + RUN_SEED) % (1 << 31)


def budget_of(kernel, layers):
    """A budget of ``layers`` times one layer's packed experts: a layer is resident from 4 (its own and the stream
    buffers: three layers' worth, see kt_patch.executor), streamed from 3 (two layers fetched ahead), or from 2 (one
    ahead), an error below."""
    return GpuExpertBudget(layers * layer_bytes(kernel) / 2**30)


def run_layer(kernel, tier, x, ids, w, dy, lora_gu, lora_dn, kernel_runs=None):
    params = [torch.nn.Parameter(t.clone()) for t in (*lora_gu[:2], *lora_dn[:2])]
    lora = ExpertLora(LoraFactors(params[0], params[1], lora_gu[2]), LoraFactors(params[2], params[3], lora_dn[2]))
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    on_kernel_run = None if kernel_runs is None else (lambda: kernel_runs.append(1))
    y = expert_forward(kernel, xr, ids, wr, lora, accelerator=tier, on_kernel_run=on_kernel_run)
    y.backward(dy)
    names = ("gate_up_A", "gate_up_B", "down_A", "down_B")
    return {"y": y.detach(), "dx": xr.grad, "dw": wr.grad, **{n: p.grad for n, p in zip(names, params)}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fraction,resident", [(0.0, False), (0.3, False), (0.3, True), (1.0, False), (1.0, True)])
@pytest.mark.parametrize("gpt_oss", [False, True], ids=["swiglu", "gpt_oss"])
def test_split_equals_the_cpu_kernel_alone(dtype, fraction, resident, gpt_oss):
    """Forced splits, resident or streamed, plain and GPT-OSS (interleaved gate/up LoRA, biases, clamped SwiGLU):
    y, dx, dw and every LoRA gradient as the CPU kernel computes them alone; the last 3 experts get no token."""
    E, H, I, T, k = 10, 72, 40, 53, 3
    weights, lora_gu, lora_dn = random_layer(E, H, I, 8, 4, dtype, seed("w", dtype, gpt_oss))
    x, ids, w, dy = random_batch(T, H, E - 3, k, dtype, seed("x", dtype, gpt_oss))
    extra = {}
    if gpt_oss:  # the clamps bind in fp32 (a limit in a gap between the values), not in bf16: see test_kernel.py
        g = torch.Generator().manual_seed(seed("bias", dtype))
        weights = (weights[0].transpose(1, 2).contiguous(), weights[1].transpose(1, 2).contiguous())
        extra = dict(activation="gpt_oss_swiglu", alpha=1.702, transposed=True, interleaved=True,
                     gate_up_bias=torch.randn(E, 2 * I, generator=g).to(dtype),
                     down_bias=(torch.randn(E, H, generator=g) * 0.1).to(dtype))
        extra["limit"] = limit_in_a_gap(x, ids, weights[0], extra["gate_up_bias"], lora_gu, 1.5) \
            if dtype == torch.float32 else 7.0
    kernel = ExpertKernel(*weights, threads=2, **extra)
    biases = {name: extra[name] for name in ("gate_up_bias", "down_bias") if name in extra}
    tier = AcceleratorTier(kernel, CPU, executor="hybrid", budget=budget_of(kernel, 4.5 if resident else 3.5),
                           accelerator_fraction=fraction, **biases)
    assert tier.tier_name == ("resident" if resident else "streamed")
    reference = run_layer(kernel, None, x, ids, w, dy, lora_gu, lora_dn)
    kernel_runs = []
    got = run_layer(kernel, tier, x, ids, w, dy, lora_gu, lora_dn, kernel_runs)
    errors = {name: rel_l2(got[name], reference[name]) for name in reference}
    assert max(errors.values()) <= TOL[dtype], f"run seed {RUN_SEED}: {errors}"
    assert len(kernel_runs) == (0 if fraction == 1.0 else 1)  # every expert on the accelerator: the kernel left out


def test_plan_puts_the_busiest_experts_on_the_accelerator_and_balances_by_rates():
    weights, _, _ = random_layer(8, 32, 16, 0, 0, torch.float32, seed("plan"))
    kernel = ExpertKernel(*weights, threads=1)
    ids = torch.tensor([[5, 2], [5, 2], [5, 1], [5, 7], [2, 0]])
    tier = AcceleratorTier(kernel, CPU, executor="hybrid", budget=budget_of(kernel, 3.5), accelerator_fraction=0.25)
    assert tier.plan(ids, first_forward=True).experts == (2, 5)
    # a streamed layer's next step is planned from its past routing (so that it can be fetched ahead), whatever its
    # own: rows per expert averaged, the last step weighing half
    assert tier.upcoming_plan().experts == (2, 5)
    other = torch.tensor([[0, 1], [0, 1], [0, 3]])
    assert tier.plan(other, first_forward=True).experts == (2, 5)
    assert tier.upcoming_plan().experts == (0, 5)  # 0 and 5 both 2 rows on average, 1 and 2 1.5
    assert tier.plan(other, first_forward=True).experts == (0, 5)
    assert tier.upcoming_plan().experts == (0, 1)  # 0: 2.5 rows, 1: 1.75, 5: 1
    # a resident layer plans from the routing at hand
    resident = AcceleratorTier(kernel, CPU, executor="hybrid", budget=budget_of(kernel, 4.5),
                               accelerator_fraction=0.25)
    assert resident.plan(ids, first_forward=True).experts == (2, 5)
    assert resident.plan(other, first_forward=True).experts == (0, 1)
    # ...unless its last split kept every expert: then it plans ahead from past routing, as a streamed layer does (the
    # host need not wait for the device to reach the layer's routing)
    whole = AcceleratorTier(kernel, CPU, executor="hybrid", budget=budget_of(kernel, 4.5), accelerator_fraction=1.0)
    whole.plan(ids, first_forward=True)
    whole.fraction = 0.25
    ahead = whole.upcoming_plan()
    assert ahead.experts == (2, 5) and whole.plan(other, first_forward=True) is ahead
    assert whole.plan(ids, first_forward=True).experts == (2, 5)  # the routing at hand again, not the past's (0, 5)
    balanced = AcceleratorTier(kernel, CPU, executor="hybrid", budget=budget_of(kernel, 3.5),
                               accelerator_fraction=None)
    rates = balanced.rates
    for cost, per_row in ((rates.cpu, 1.0), (rates.accelerator, 1.0), (rates.link, 0.0)):
        cost.per_unit, cost.per_row = 0.0, per_row
    # rows per expert 4 (5), 3 (2), 1, 1, 1: equal rates split the 10 rows as near half as the experts allow
    plan = balanced.plan(ids, first_forward=True)
    assert plan.experts in ((5,), (2, 5))
    rates.cpu.per_row = 100.0  # the CPU much slower: everything goes to the accelerator...
    assert balanced.plan(ids, first_forward=False) is plan  # ...not in this step's recompute...
    assert balanced.plan(ids, first_forward=True).everything  # ...from the next step on
    # CPU rows 3x the accelerator's: 3 experts (8 rows) balance 2 rows on the CPU best, until streaming an expert
    # costs 4 rows' time: then 2 (7 rows, 8 s of link against 9 s of CPU)
    rates.cpu.per_row, rates.link.per_unit = 3.0, 0.0
    assert len(balanced.upcoming_plan().experts) == 3
    balanced.plan(ids, first_forward=True)
    rates.link.per_unit = 4.0
    assert balanced.upcoming_plan().experts == (2, 5)
    # a CPU whose time goes by experts, not rows (their weights read from memory): it keeps no 1-row expert, and
    # no split gains enough to give it the experts without rows: streaming them hides under the accelerator's time
    balanced.plan(ids, first_forward=True)
    rates.cpu.per_unit, rates.cpu.per_row, rates.link.per_unit = 10.0, 0.1, 1.0
    assert balanced.upcoming_plan().everything
    # each layer scales the shared fits by what it measured against what they forecast for the split it ran: with
    # equal rates the 5 (4 rows) or the 5 and the 2 (7) go to the accelerator, as above; a CPU measured at 3x its
    # forecast then keeps 2 rows (3 experts, 8 rows, on the accelerator)
    balanced.plan(ids, first_forward=True)
    for cost, per_row in ((rates.cpu, 1.0), (rates.accelerator, 1.0), (rates.link, 0.0)):
        cost.per_unit, cost.per_row = 0.0, per_row
    rates.scale = {"cpu": 1.0, "accelerator": 1.0, "link": 1.0}
    plan = balanced.upcoming_plan()
    forecast = {side: getattr(rates, side).seconds(*plan.forecast[side]) for side in ("cpu", "accelerator")}
    assert plan.experts in ((5,), (2, 5)) and forecast["cpu"] > 0
    assert balanced.plan(ids, first_forward=True) is plan  # the step that runs it measures...
    rates.cpu.per_row = 2.0  # other layers have moved the shared fit since the plan: the scale is against it now
    balanced._window.parts["cpu"] = [(False, 6 * forecast["cpu"])]
    balanced._window.parts["accelerator"] = [(False, types.SimpleNamespace(seconds=lambda: forecast["accelerator"]))]
    balanced._close_window()
    assert rates.scale["cpu"] == pytest.approx(3.0) and rates.scale["accelerator"] == pytest.approx(1.0)
    for cost, per_row in ((rates.cpu, 1.0), (rates.accelerator, 1.0), (rates.link, 0.0)):  # the fits as they were
        cost.per_unit, cost.per_row = 0.0, per_row
    experts = balanced.upcoming_plan().experts  # ...and the next one is planned from it
    assert len(experts) == 3 and {2, 5} < set(experts)
    # the two sides wait for the layer's non-expert part, the link overlaps it: with the CPU at 1 per row, the
    # accelerator at 1/2 and the link at 3 per expert, one expert (6 on the CPU against 2 and 3) makes the
    # shortest step; after 4 s of non-expert time two do (4 + 3.5 against 6: the link hides under the rest)
    balanced.plan(ids, first_forward=True)
    rates.cpu.per_unit, rates.cpu.per_row, rates.accelerator.per_unit, rates.accelerator.per_row = 0.0, 1.0, 0.0, 0.5
    rates.link.per_unit, rates.link.per_row = 3.0, 0.0
    rates.scale = {"cpu": 1.0, "accelerator": 1.0, "link": 1.0}
    rates.backward_share = dict.fromkeys(rates.backward_share, 0.5)  # every side's time alike in both passes
    assert balanced.upcoming_plan().experts == (5,)
    balanced.plan(ids, first_forward=True)
    rates.rest = 4.0
    assert balanced.upcoming_plan().experts == (2, 5)


def test_the_link_overlaps_each_pass_so_the_cpu_is_costed_by_the_pass_it_works_in():
    """A layer's step is its forward pass and its backward pass (recompute included), the link fetching for each
    while that pass computes. With three quarters of the CPU's time in the backward (measured), one more expert goes
    to the accelerator than a balance of step totals would give: the CPU's backward would outlast the link's."""
    weights, _, _ = random_layer(8, 32, 16, 0, 0, torch.float32, seed("passes"))
    kernel = ExpertKernel(*weights, threads=1)
    ids = torch.tensor([[5, 2], [5, 2], [5, 1], [5, 7], [2, 0]])  # rows 4, 3, 1, 1, 1, 0, 0, 0
    tier = AcceleratorTier(kernel, CPU, executor="hybrid", budget=budget_of(kernel, 3.5), accelerator_fraction=None)
    rates = tier.rates
    for cost, per_unit, per_row in ((rates.cpu, 0.0, 1.0), (rates.accelerator, 0.0, 0.0), (rates.link, 1.0, 0.0)):
        cost.per_unit, cost.per_row = per_unit, per_row
    assert tier.plan(ids, first_forward=True).experts == (2, 5)  # totals: 3 s of CPU against 2 s of link
    rates.steps = 1  # past the warm-up step: the next window is measured
    window = tier._window
    window.parts["cpu"] = [(False, 1.0), (True, 1.0), (True, 2.0)]  # forward, recompute, backward
    window.parts["link"] = [(False, 1.0), (True, 1.0)]
    tier._close_window()
    assert rates.backward_share["cpu"] == pytest.approx(0.75) and rates.backward_share["link"] == 0.5
    rates.cpu.per_unit, rates.cpu.per_row, rates.link.per_unit = 0.0, 1.0, 1.0  # the fits as they were
    rates.scale = {"cpu": 1.0, "accelerator": 1.0, "link": 1.0}
    # 2 experts: 0.75 + 2.25 s (the CPU's backward); 3: 1.5 + 1.5 s (the link's in both passes)
    experts = tier.plan(ids, first_forward=True).experts
    assert len(experts) == 3 and {2, 5} < set(experts)


def test_a_split_pays_the_time_its_measured_sides_do_not_explain():
    """A step with experts in the CPU kernel took longer on the device's queue than its sides' measured times explain
    (the host waited for copies and for the kernel meanwhile): that overhead is charged to every split that calls the
    kernel, so one that gained less goes back to the accelerator alone."""
    weights, _, _ = random_layer(8, 32, 16, 0, 0, torch.float32, seed("overhead"))
    kernel = ExpertKernel(*weights, threads=1)
    ids = torch.tensor([[5, 2], [5, 2], [5, 1], [5, 7], [2, 0]])  # rows 4, 3, 1, 1, 1, 0, 0, 0
    tier = AcceleratorTier(kernel, CPU, executor="hybrid", budget=budget_of(kernel, 3.5), accelerator_fraction=None)
    rates = tier.rates

    def fits():
        for cost, per_unit, per_row in ((rates.cpu, 0.0, 1.0), (rates.accelerator, 0.0, 0.0), (rates.link, 1.0, 0.0)):
            cost.per_unit, cost.per_row = per_unit, per_row
        rates.scale = {"cpu": 1.0, "accelerator": 1.0, "link": 1.0}
        rates.backward_share = dict.fromkeys(rates.backward_share, 0.5)

    fits()
    assert tier.plan(ids, first_forward=True).experts == (2, 5)  # 3 s of CPU against 2 s of link, 8 s for all
    rates.steps = 1  # past the warm-up step: the next window is measured
    tier._window.parts.update(cpu=[(False, 1.0), (True, 2.0)], link=[(False, 1.0), (True, 1.0)],
                              rest=[(False, 0.5), (True, 0.5)], span=[(False, 3.0), (True, 5.5)])
    tier._close_window()
    # explained: max(0.5 + 1, 1) + max(0.5 + 2, 1) = 4 s; taken: 8.5 s of expert parts and 1 s of the rest
    assert rates.split_overhead == pytest.approx(5.5)
    fits()
    rates.rest = 0.0
    assert tier.plan(ids, first_forward=True).everything  # 3 + 5.5 s (or more for fewer experts) against 8
    # unmeasured while the CPU kernel has nothing, it fades, so that a split is measured again in time
    tier._window.parts.update(link=[(False, 4.0), (True, 4.0)], span=[(False, 4.0), (True, 4.0)])
    tier._close_window()
    assert rates.split_overhead == pytest.approx(5.5 * 0.9)


def test_a_streamed_plan_is_costed_by_the_rows_its_places_got_not_by_past_popularity():
    """Routing that moves between steps: the experts busiest in a streamed layer's past need not be busy next. Its
    plan (chosen before its routing is known) orders the experts by past rows, but costs each place in that order by
    the rows the place got in the steps planned so, which here the averaged past rows would put near zero."""
    weights, _, _ = random_layer(8, 32, 16, 0, 0, torch.float32, seed("places"))
    kernel = ExpertKernel(*weights, threads=1)
    tier = AcceleratorTier(kernel, CPU, executor="hybrid", budget=budget_of(kernel, 3.5), accelerator_fraction=None)
    rates = tier.rates
    for cost, per_row in ((rates.cpu, 1.0), (rates.accelerator, 1.0), (rates.link, 0.0)):
        cost.per_unit, cost.per_row = 0.0, per_row
    for step in range(8):  # each step's busy pair is the one least busy in the steps before
        hot = [(2 * step) % 8, (2 * step + 1) % 8]
        ids = torch.tensor([hot] * 6 + [[(2 * step + 2) % 8, (2 * step + 4) % 8]])  # 6 + 6 rows, 1 + 1 elsewhere
        popularity = None if tier._popularity is None else tier._popularity.clone()
        plan = tier.plan(ids, first_forward=True)
        counts = torch.bincount(ids.flatten(), minlength=8)
        on_cpu = [e for e in range(8) if e not in plan.experts]
        if step >= 4:  # the CPU's rows forecast as they come, where the past rows of its experts say a third or less
            assert abs(plan.forecast["cpu"][1] - int(counts[on_cpu].sum())) <= 2
            assert float(popularity[on_cpu].sum()) < int(counts[on_cpu].sum()) / 3
        tier.upcoming_plan()


def test_host_copies_of_factors_know_what_they_were_copied_from():
    """Host copies of device factors (the CUDA path of AcceleratorTier.host_lora) stand for the factors only while
    they are the same tensors, unchanged in place and with the same scalings: a new version, a new scaling or another
    tensor (also one alive at the address of a freed one) makes them stale. Device copies of host factors go by the
    same sources, without the scalings (applied when they are used)."""
    from kt_patch.executor import _FactorSources, _HostFactors

    g = torch.Generator().manual_seed(seed("host-factors"))
    factors = [torch.nn.Parameter(torch.randn(16, 8, generator=g)) for _ in range(2)]
    lora = ExpertLora(LoraFactors(factors[0], factors[1], 2.0))
    made = _HostFactors(3, True, lora.on_host(), _FactorSources.of(lora))
    assert made.copied(lora) and made.copied(ExpertLora(LoraFactors(factors[0], factors[1], 2.0)))
    assert not made.copied(ExpertLora(LoraFactors(factors[0], factors[1], 4.0)))
    assert made.sources.unchanged(ExpertLora(LoraFactors(factors[0], factors[1], 4.0)))
    assert not made.copied(ExpertLora(LoraFactors(factors[0].detach().clone(), factors[1], 2.0)))
    with torch.no_grad():
        factors[1].mul_(1.5)
    assert not made.copied(lora)
    made = _HostFactors(4, True, lora.on_host(), _FactorSources.of(lora))
    del lora, factors  # a new factor may take the freed one's id: the weak reference tells them apart
    fresh = [torch.nn.Parameter(torch.randn(16, 8, generator=g)) for _ in range(2)]
    assert not made.copied(ExpertLora(LoraFactors(fresh[0], fresh[1], 2.0)))


def test_layers_of_one_shape_share_their_step_costs():
    """The CPU kernel's cost is shared by the layers of one shape, the accelerator's also by tier (resident or
    streamed): each fit then sees many layers' splits."""
    def kernel(H):
        weights, _, _ = random_layer(6, H, 16, 4, 4, torch.float32, seed("share", H))
        return ExpertKernel(*weights, threads=1)

    shared = SharedRates()
    a, b, other = kernel(32), kernel(32), kernel(48)
    tier = lambda k, layers: AcceleratorTier(k, CPU, executor="hybrid", budget=budget_of(k, layers),  # noqa: E731
                                             accelerator_fraction=None, shared_rates=shared)
    streamed_a, streamed_b, resident_b, streamed_other = tier(a, 3.5), tier(b, 3.5), tier(b, 4.5), tier(other, 3.5)
    assert streamed_a.rates.cpu is streamed_b.rates.cpu is resident_b.rates.cpu
    assert streamed_a.rates.accelerator is streamed_b.rates.accelerator is not resident_b.rates.accelerator
    assert streamed_a.rates.link is streamed_b.rates.link
    assert streamed_other.rates.cpu is not streamed_a.rates.cpu
    assert streamed_a.rates is not streamed_b.rates  # each layer skips its own first (warm-up) step
    assert len(streamed_a.rates.cpu.layers) == len(streamed_a.rates.accelerator.layers) == 2
    tier(a, 3.5)  # a layer's tier made anew (the model moved again) is the same layer to the fit
    assert len(streamed_a.rates.cpu.layers) == len(streamed_a.rates.accelerator.layers) == 2


def test_each_layer_measures_its_non_expert_time():
    """The time between the expert parts of consecutive layers is the later layer's non-expert time (its attention,
    here slowed down in the forward of layer 1); the time between the forward and the backward (the head, the loss)
    and the step's end (the optimizer) are no layer's."""
    import time

    torch.manual_seed(0)
    model = tiny_models.build("qwen3_moe", seed=3)
    patch_model(model, resolve({"threads": 2, "executor": "hybrid"}))
    layers = model.model.layers
    layers[1].self_attn.register_forward_pre_hook(lambda *_: time.sleep(0.2))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    data = torch.Generator().manual_seed(seed("rest"))
    for _ in range(3):
        ids = torch.randint(3, tiny_models.COMMON["vocab_size"], (2, 12), generator=data)
        loss = model(input_ids=ids, labels=ids).loss
        time.sleep(0.3)  # between the forward and the backward
        loss.backward()
        time.sleep(0.3)  # the step's end
        optimizer.step()
        optimizer.zero_grad()
    first, second = (layer.mlp.accelerator for layer in layers)
    assert first.rates.steps == second.rates.steps == 2  # windows closed: the first step's (warm-up) and the next
    assert 0.2 <= second.busy_seconds["rest"] / 2 < 0.35
    assert first.busy_seconds["rest"] / 2 < 0.1 and first.rates.rest < 0.1 <= 0.2 <= second.rates.rest


def test_step_costs_are_fitted_per_unit_and_per_row():
    g = torch.Generator().manual_seed(seed("cost"))
    per_unit, per_row = 1e-3 * (1 + torch.rand(1, generator=g).item()), 1e-6 * (1 + torch.rand(1, generator=g).item())
    cost = _Cost(unit_share=0.5)
    cost.add(64, 3000, per_unit * 64 + per_row * 3000)  # one split: half each
    assert cost.per_unit * 64 == pytest.approx(cost.per_row * 3000)
    assert cost.seconds(64, 3000) == pytest.approx(per_unit * 64 + per_row * 3000)
    for experts, rows in ((100, 9000), (20, 12000), (128, 16000)):
        cost.add(experts, rows, per_unit * experts + per_row * rows)
    assert (cost.per_unit, cost.per_row) == pytest.approx((per_unit, per_row))
    link = _Cost(unit_share=1.0)
    link.add(40, 0, 0.02)  # no rows: all per unit
    assert (link.per_unit, link.per_row) == (0.02 / 40, 0.0)
    # the accelerator: a fixed part (unit 1) and rows; alike splits put it all on the fixed part, so that its experts
    # do not look dear for a time they do not cost
    accelerator = _Cost(unit_share=1.0)
    for rows in (1000, 1010):
        accelerator.add(1, rows, 0.02 + per_row * rows)
    assert accelerator.per_row == 0 and accelerator.per_unit == pytest.approx(0.02 + per_row * 1005)
    accelerator.add(1, 12000, 0.02 + per_row * 12000)
    assert (accelerator.per_unit, accelerator.per_row) == pytest.approx((0.02, per_row))


def train(model_type, options, mode, policy, accumulation=3, steps=10):
    """AdamW steps of LoRA (attention and experts) with gradient accumulation, on fixed random tokens."""
    from peft import get_peft_model

    torch.manual_seed(0)
    model = tiny_models.build(model_type, seed=2)
    if options is not None:
        patch_model(model, resolve({"threads": 2, "checkpoint_policy": policy, **options}))
    config = tiny_models.lora_config(model_type)
    config.init_lora_weights = False
    model = get_peft_model(model, config)
    if mode is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": mode == "reentrant"})
        model.enable_input_require_grads()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    data = torch.Generator().manual_seed(seed("data", model_type))
    losses = []
    for step in range(steps):
        for layer in model.modules():  # a split that changes between steps
            if isinstance(layer, KtMoeLayer) and layer.accelerator is not None:
                layer.accelerator.fraction = (0.3, 0.7, 0.0, 1.0)[step % 4]
        for _ in range(accumulation):
            ids = torch.randint(3, tiny_models.COMMON["vocab_size"], (2, 12), generator=data)
            loss = model(input_ids=ids, labels=ids).loss / accumulation
            loss.backward()
            losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad()
    if options is not None:
        layers = [layer for layer in model.modules() if isinstance(layer, KtMoeLayer)]
        assert layers and all(layer.accelerator is not None for layer in layers)
        if options["executor"] == "accelerator":
            assert all(layer.expert_runs == 0 for layer in layers)
    return losses


@pytest.mark.parametrize("mode,policy,executor", [(None, "recompute", "hybrid"), ("non_reentrant", "recompute", "hybrid"),
                                                  ("non_reentrant", "retain", "hybrid"),
                                                  ("reentrant", "retain", "hybrid"),
                                                  ("non_reentrant", "recompute", "accelerator")])
def test_whole_model_trains_as_unpatched(mode, policy, executor):
    """Hybrid with a split that changes between steps, and every expert on the accelerator (the CPU kernel left out):
    the losses of the unpatched model."""
    stock = train("qwen2_moe", None, mode, policy)
    split = train("qwen2_moe", {"executor": executor, "accelerator_fraction": 0.3}, mode, policy)
    assert max(abs(a - b) / abs(a) for a, b in zip(stock, split)) <= 1e-4, (stock, split)


def test_expert_lora_factors_go_with_the_model_unless_the_executor_is_cpu():
    """Unless executor='cpu', .to() moves the expert-LoRA factors with the model (here to the meta device), where the
    accelerator tiers use them (the CPU kernel reads host copies); with executor='cpu', expert_lora_placement='host',
    or once an integration keeps them on the host, they stay in host memory. A factor moved elsewhere anyway is a
    clear error at the forward. (An adapter added to a model on a GPU gets them there: test_executor_cuda.py; one
    whose layers are on the meta device, as accelerate's offloading leaves them, has no values to put them beside.)"""
    from peft import get_peft_model

    ids = torch.randint(3, tiny_models.COMMON["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(5))
    for executor in ("accelerator", "cpu"):
        model = tiny_models.build("qwen3_moe", seed=4)
        patch_model(model, resolve({"threads": 2, "executor": executor}))
        model = get_peft_model(model, tiny_models.lora_config("qwen3_moe"))
        names = [name for name, _ in model.named_parameters() if ".experts." in name and "lora_" in name]
        assert names and all(model.get_parameter(name).device.type == "cpu" for name in names)
        model(input_ids=ids)
        holder, _, attribute = names[0].rpartition(".")
        setattr(model.get_submodule(holder), attribute, torch.nn.Parameter(torch.empty(0, device="meta")))
        with pytest.raises(RuntimeError, match="expert LoRA factors must be in host memory" +
                           (r" or on the model's device \(cpu\)" if executor == "accelerator" else
                            r" \(they are kept there: executor='cpu'") + ".*; something moved them to meta"):
            model(input_ids=ids)
        model.to("meta")
        assert all(model.get_parameter(name).device.type == ("meta" if executor == "accelerator" else "cpu")
                   for name in names[1:])
        kt_patch.enable(threads=2, executor=executor)  # its PEFT hook places the factors of a new adapter
        try:
            moved = tiny_models.build("qwen3_moe", seed=4)
            assert moved.kt_patch_summary.layers == 2
            moved = get_peft_model(moved.to("meta"), tiny_models.lora_config("qwen3_moe"))
        finally:
            kt_patch.disable()
        assert all(moved.get_parameter(name).device.type == "cpu" for name in names)
    # kept in host memory by the option, or as the DeepSpeed integration keeps them
    for placement, keep in (("host", False), ("model", True)):
        kept = tiny_models.build("qwen3_moe", seed=4)
        patch_model(kept, resolve({"threads": 2, "executor": "accelerator", "expert_lora_placement": placement}))
        kept = get_peft_model(kept, tiny_models.lora_config("qwen3_moe"))
        for layer in kept.modules():
            if keep and isinstance(layer, KtMoeLayer):
                layer.keep_expert_lora_on_host()
        kept.to("meta")
        assert all(kept.get_parameter(name).device.type == "cpu" for name in names), placement


def test_resident_layers_are_spread_over_the_model():
    """A budget that holds two of four layers' experts beside the stream buffers makes every second layer resident,
    not the first two (each resident layer then computes while the link fetches the streamed ones after it), whatever
    order the layers' tiers are made in; one with room for every layer keeps them all, also when they are made anew."""
    one_layer = tiny_models.expert_layer_bytes()
    for layers, expected in ((5.5, ["streamed", "resident", "streamed", "resident"]), (7.0, ["resident"] * 4)):
        patched = tiny_models.build("qwen3_moe", seed=2, num_hidden_layers=4)
        patch_model(patched, resolve({"threads": 1, "executor": "accelerator",
                                      "gpu_expert_budget": layers * one_layer / 2**30}))
        moe = [m for m in patched.modules() if isinstance(m, KtMoeLayer)]
        for layer in reversed(moe):  # tiers made last layer first
            layer._accelerator_for(CPU)
        assert [layer.accelerator.tier_name for layer in moe] == expected, layers
    # a layer's tier made anew (its experts reloaded from a state dict) takes the room its last one held, not more
    patched.load_state_dict(patched.state_dict())
    for layer in moe:
        assert layer.accelerator is None
        layer._accelerator_for(CPU)
    assert [layer.accelerator.tier_name for layer in moe] == ["resident"] * 4


def test_the_prefetcher_fetches_two_streamed_layers_ahead_and_keeps_the_rows_at_either_end_of_a_pass():
    """The prefetcher's bookkeeping over a model whose resident layers sit between streamed ones (as the budget spreads
    them), driven as the tiers drive it (no GPU: fake tiers whose fetches are recorded): from the second step every
    streamed layer finds its rows ahead, at most two layers' rows are ahead at any time (the stream buffers), the
    forward's last streamed layer keeps its rows for its recompute and the backward's last two for the next forward
    (a resident layer between them does not let them go), and no rows that will be used are released before."""
    from kt_patch.executor import TierPlan, _FetchedRows, _Prefetcher

    plan = TierPlan(tuple(range(4)), 4)
    fetched, released = [], []

    class Tier:
        def __init__(self, name, resident):
            self.name, self.resident, self.fetch_depth, self.step_plan = name, {} if resident else None, 2, plan

        def upcoming_plan(self):
            return plan

        def fetch(self, plan, backward):
            fetched.append(self.name)
            return _FetchedRows(plan, {}, None, None)

        def with_current_factors(self, rows):
            return rows

    prefetcher = _Prefetcher(copy_stream=None)  # no GPU here: releases are recorded instead
    prefetcher._release = lambda entries: released.extend(rows for _, rows in entries)
    tiers = [Tier(name, resident=name.startswith("R")) for name in ("S0", "R1", "S2", "R3", "S4", "S5")]
    for tier in tiers:
        prefetcher.register(tier)
    for step in range(3):
        hits = []
        for backward, order in ((False, tiers), (True, tiers[::-1])):
            for tier in order:
                if tier.resident is not None:
                    prefetcher.fetch_next(tier, backward)
                    continue
                rows = prefetcher.take(tier, plan)
                hits.append(rows is not None)
                rows = rows or tier.fetch(plan, backward)
                assert not any(rows is other for other in released), (step, tier.name)
                if not prefetcher.keep(tier, backward, rows):
                    prefetcher.fetch_next(tier, backward)
                assert len(prefetcher._ahead) <= 2, (step, tier.name)
            names = [holder().name for holder, _ in prefetcher._ahead]
            assert names == (["S5"] if not backward else ["S0", "S2"]), (step, backward, names)
        if step:
            assert all(hits), (step, hits)
    # per step from the second: each of the 4 streamed layers once per pass, less the 3 kept rows
    assert len(fetched) == 4 + 3 + 2 * (2 * 4 - 3), fetched
    assert not released


def test_each_model_has_its_own_prefetch_order_on_a_device(monkeypatch):
    """Two patched models on one device (a policy and a reference model): each model's layers are in an order of their
    own (one's layers would otherwise be fetched ahead of the other's next pass), the fetches of both share the
    device's copy stream (the link serves them in order), and a model's order and the rows it holds go with it."""
    import weakref

    from kt_patch import executor

    monkeypatch.setattr(executor, "_prefetchers", weakref.WeakKeyDictionary())
    monkeypatch.setattr(executor, "_copy_streams", {})
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: types.SimpleNamespace(device=device))  # no GPU here
    device = torch.device("cuda", 0)
    first, second = GpuExpertBudget(4), GpuExpertBudget(4)  # each patched model's layers share one
    prefetcher = executor._prefetcher(first, device)
    assert executor._prefetcher(first, device) is prefetcher
    other = executor._prefetcher(second, device)
    assert other is not prefetcher and other.copy_stream is prefetcher.copy_stream
    assert executor._prefetcher(first, torch.device("cuda", 1)).copy_stream is not prefetcher.copy_stream
    gone = weakref.ref(prefetcher)  # with the rows it holds ahead
    del first, prefetcher
    gc.collect()
    assert list(executor._prefetchers) == [second] and gone() is None


def test_a_layer_that_gives_the_accelerator_nothing_lets_its_rows_ahead_go():
    """A step whose plan puts no expert on the accelerator never takes the rows fetched or kept for the layer: they
    are let go when it plans (else they stayed ahead through the step, beyond the stream buffers)."""
    weights, _, _ = random_layer(8, 32, 16, 0, 0, torch.float32, seed("forget"))
    kernel = ExpertKernel(*weights, threads=1)
    calls = []
    prefetcher = types.SimpleNamespace(register=lambda tier: None, forget=lambda tier: calls.append(tier))
    tier = AcceleratorTier(kernel, CPU, executor="hybrid", budget=budget_of(kernel, 3.5), accelerator_fraction=0.5)
    tier.prefetcher = prefetcher  # as on a GPU
    ids = torch.randint(0, 8, (16, 2))
    assert tier.plan(ids, first_forward=True).any and not calls
    tier.fraction = 0.0
    assert not tier.plan(ids, first_forward=True).any and calls == [tier]


def test_a_step_starts_where_its_first_layer_plans(monkeypatch):
    """The event that host copies of factors wait for (and that fetched copies of host factors are stamped with) is
    recorded where each step's first MoE layer plans, after the optimizer's step: in the first step where each layer
    is first seen, from the second where the first layer plans again; a layer made anew records it again (CUDA events
    stood in for on the CPU)."""
    from kt_patch import executor as executor_module

    class Event:
        def record(self, stream):
            self.stream = stream

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: None)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: "compute")
    start = executor_module._StepStart(torch.device("cuda", 0))
    events = []
    for step in range(3):
        for position in range(4):
            start.planned(position)
            events.append(start.event)
    first, second, third = events[:4], events[4:8], events[8:]
    assert len({id(e) for e in first}) == 4  # each layer of the first step, seen for the first time
    assert all(e is second[0] for e in second) and all(e is third[0] for e in third)
    assert second[0] is not first[-1] and third[0] is not second[0]
    start.planned(4)  # a layer made anew in the third step
    assert start.event is not third[0]
    start.planned(0)
    assert start.event is not events[-1]


def test_factors_cast_with_the_model_reach_the_kernel_in_a_dtype_it_takes():
    """.half() after patching casts the expert-LoRA factors with the model (executor='auto' on the host): the kernel
    gets fp32 copies of them and their gradients come back in fp16, as the factors' own dtype."""
    from peft import get_peft_model

    model = tiny_models.build("qwen3_moe", seed=6)
    patch_model(model, resolve({"threads": 2}))
    model = get_peft_model(model, tiny_models.lora_config("qwen3_moe")).half()
    ids = torch.randint(3, tiny_models.COMMON["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(6))
    model(input_ids=ids, labels=ids).loss.backward()
    factors = [p for name, p in model.named_parameters() if ".experts." in name and "lora_B" in name]
    assert factors and all(p.dtype == torch.float16 and p.grad.dtype == torch.float16 for p in factors)
    assert all(bool(torch.isfinite(p.grad).all()) and p.grad.abs().sum() > 0 for p in factors)


def test_bad_executor_options_are_clear_errors():
    for bad, message in (({"executor": "gpu"}, "'executor' must be one of auto, cpu, accelerator, hybrid"),
                         ({"accelerator_fraction": 1.5}, "'accelerator_fraction' must be a number in \\[0, 1\\]"),
                         ({"gpu_expert_budget": "lots"}, "'gpu_expert_budget' must be 'auto' or a number"),
                         ({"expert_lora_placement": "gpu"}, "'expert_lora_placement' must be one of model, host")):
        with pytest.raises(OptionError, match=message):
            resolve(bad)
    weights, _, _ = random_layer(4, 32, 16, 0, 0, torch.float32, seed("budget"))
    kernel = ExpertKernel(*weights, threads=1)
    for layers, depth in ((4.5, 2), (3.0, 2), (2.9, 1), (2.0, 1)):  # streamed within the budget, fetched ahead so far
        tier = AcceleratorTier(kernel, CPU, executor="hybrid", budget=budget_of(kernel, layers),
                               accelerator_fraction=0.5)
        assert (tier.tier_name, tier.fetch_depth) == ("resident" if layers > 4 else "streamed", depth), layers
    for budget in (GpuExpertBudget(1e-9), budget_of(kernel, 1.9)):
        with pytest.raises(ValueError, match="'gpu_expert_budget' .* is below one layer's stream buffers"):
            AcceleratorTier(kernel, CPU, executor="hybrid", budget=budget, accelerator_fraction=0.5)
    model = tiny_models.build("qwen3_moe", seed=2)  # found when the model is patched, not at its first step
    with pytest.raises(ValueError, match="'gpu_expert_budget' .* is below one layer's stream buffers"):
        patch_model(model, resolve({"threads": 1, "executor": "auto", "gpu_expert_budget": 1e-6}))
    assert not any(isinstance(m, KtMoeLayer) for m in model.modules())  # nothing half-patched
    patch_model(model, resolve({"threads": 1, "executor": "cpu", "gpu_expert_budget": 1e-6}))  # unused: no error
    # a device the accelerator tiers do not run on: an error naming the option at the layer's first forward, before
    # any expert runs; executor='auto' leaves every expert to the CPU kernel there
    for executor in ("accelerator", "hybrid", "auto"):
        model = tiny_models.build("qwen3_moe", seed=2)
        patch_model(model, resolve({"threads": 1, "executor": executor}))
        layer = next(m for m in model.modules() if isinstance(m, KtMoeLayer)).to("meta")
        tokens = torch.empty(3, model.config.hidden_size, device="meta")
        if executor == "auto":
            assert layer._accelerator_for(tokens.device) is None
            continue
        with pytest.raises(ValueError, match=f"'executor' is '{executor}', but the model is on meta"):
            layer(tokens)
        assert layer.expert_runs == 0


def test_out_of_accelerator_memory_falls_back_to_the_cpu_kernel(monkeypatch, caplog):
    """An out-of-memory error in the accelerator's forward or backward: that call's accelerator experts run in the
    CPU kernel instead, with a warning, and every result is still the CPU-only path's."""
    E, H, I, T, k = 10, 72, 40, 41, 3
    weights, lora_gu, lora_dn = random_layer(E, H, I, 8, 4, torch.float32, seed("oom"))
    x, ids, w, dy = random_batch(T, H, E, k, torch.float32, seed("oomx"))
    kernel = ExpertKernel(*weights, threads=2)
    tier = AcceleratorTier(kernel, CPU, executor="hybrid", budget=budget_of(kernel, 3.5), accelerator_fraction=0.5)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("no room")

    monkeypatch.setattr(tier, "_run", out_of_memory)
    reference = run_layer(kernel, None, x, ids, w, dy, lora_gu, lora_dn)
    with caplog.at_level("WARNING", logger="kt_patch"):
        got = run_layer(kernel, tier, x, ids, w, dy, lora_gu, lora_dn)
    assert "out of accelerator memory in the forward" in caplog.text
    assert "out of accelerator memory in the backward" in caplog.text
    errors = {name: rel_l2(got[name], reference[name]) for name in reference}
    assert max(errors.values()) <= 1e-5, f"run seed {RUN_SEED}: {errors}"
