"""fp32 PyTorch reference of the routed-expert MoE with PEFT-layout LoRA, and random inputs for the kernel tests."""
import torch
import torch.nn.functional as F


def lora_delta(x, A, B, scaling, e, E):
    """scaling * B_e (A_e x) for the rows x, PEFT ParamWrapper layout (A rows e*r+j, B columns j*E+e)."""
    r = A.shape[0] // E
    A_e = A.view(E, r, -1)[e]
    B_e = B.view(B.shape[0], r, E)[:, :, e]
    return scaling * (x @ A_e.T) @ B_e.T


def routed_sum(x, ids, w, E, expert):
    """y[t] = sum_j w[t,j] expert(e = ids[t,j], x[t]), with expert(e, rows) evaluated on all rows routed to e."""
    y = torch.zeros_like(x)
    for e in range(E):
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        if tok.numel():
            y = y.index_add(0, tok, expert(e, x[tok]) * w[tok, slot].unsqueeze(1))
    return y


def moe_forward(x, ids, w, gate_up, down, lora_gu=None, lora_dn=None):
    """SwiGLU experts in the transformers layout (gate_up [E, 2I, H], down [E, H, I]), in the inputs' dtype."""
    E, two_i, _ = gate_up.shape
    I = two_i // 2

    def expert(e, xe):
        gu = xe @ gate_up[e].T
        if lora_gu is not None:
            gu = gu + lora_delta(xe, *lora_gu, e, E)
        z = F.silu(gu[:, :I]) * gu[:, I:]
        d = z @ down[e].T
        return d if lora_dn is None else d + lora_delta(z, *lora_dn, e, E)

    return routed_sum(x, ids, w, E, expert)


def gpt_oss_gate_up(xe, e, gate_up, gate_up_bias, lora_gu):
    """Expert e's interleaved (gate, up, ...) pre-activations for its rows xe, with bias and LoRA."""
    gu = xe @ gate_up[e] + gate_up_bias[e]
    return gu if lora_gu is None else gu + lora_delta(xe, *lora_gu, e, gate_up.shape[0])


def gpt_oss_forward(x, ids, w, gate_up, down, lora_gu=None, lora_dn=None, *, gate_up_bias, down_bias, alpha, limit):
    """GPT-OSS experts as transformers writes them: gate_up [E, H, 2I] with gate/up interleaved, down [E, I, H],
    biases, clamped activation; LoRA as PEFT applies it to transposed experts (B rows follow the 2I columns)."""
    E = gate_up.shape[0]

    def expert(e, xe):
        gu = gpt_oss_gate_up(xe, e, gate_up, gate_up_bias, lora_gu)
        gate, up = gu[:, ::2].clamp(max=limit), gu[:, 1::2].clamp(min=-limit, max=limit)
        z = (up + 1) * gate * torch.sigmoid(gate * alpha)
        d = z @ down[e] + down_bias[e]
        return d if lora_dn is None else d + lora_delta(z, *lora_dn, e, E)

    return routed_sum(x, ids, w, E, expert)


def limit_in_a_gap(x, ids, gate_up, gate_up_bias, lora_gu, around):
    """A GPT-OSS clamp limit near `around` that no |pre-activation| of the batch comes close to (the middle of the widest
    gap between them within +-20%): a clamp is discontinuous, so a value within rounding of the limit would flip
    sides between the kernel and the reference and no fp32 tolerance could hold."""
    v = torch.cat([gpt_oss_gate_up(x[(ids == e).any(dim=1)], e, gate_up, gate_up_bias, lora_gu).abs().flatten()
                   for e in range(gate_up.shape[0])]).double()
    v = v[(v > 0.8 * around) & (v < 1.2 * around)].sort().values
    edges = torch.cat([v.new_tensor([0.8 * around]), v, v.new_tensor([1.2 * around])])
    widest = (edges[1:] - edges[:-1]).argmax()
    return float((edges[widest] + edges[widest + 1]) / 2)


def random_layer(E, H, I, r_gu, r_dn, dtype, seed):
    g = torch.Generator().manual_seed(seed)

    def rn(*shape, scale):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    weights = (rn(E, 2 * I, H, scale=H ** -0.5), rn(E, H, I, scale=I ** -0.5))
    lora_gu = (rn(E * r_gu, H, scale=H ** -0.5), rn(2 * I, E * r_gu, scale=0.1), 2.0) if r_gu else None
    lora_dn = (rn(E * r_dn, I, scale=I ** -0.5), rn(H, E * r_dn, scale=0.1), 0.5) if r_dn else None
    return weights, lora_gu, lora_dn


def random_batch(T, H, E, k, dtype, seed, distinct=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    if distinct:
        ids = torch.rand(T, E, generator=g).argsort(dim=1)[:, :k]
    else:
        ids = torch.randint(0, E, (T, k), generator=g)
    w = torch.rand(T, k, generator=g) + 0.1
    dy = (torch.randn(T, H, generator=g) * 0.1).to(dtype)
    return x, ids, w, dy


def reference_grads(x, ids, w, dy, weights, lora_gu, lora_dn, forward=moe_forward, **extra):
    """fp32 outputs and gradients: y, dx, dw and the LoRA factor grads."""
    f32 = lambda t: t.detach().float().clone().requires_grad_(True)
    xr, wr = f32(x), f32(w)
    gu = tuple(f32(t) for t in lora_gu[:2]) + (lora_gu[2],) if lora_gu else None
    dn = tuple(f32(t) for t in lora_dn[:2]) + (lora_dn[2],) if lora_dn else None
    extra = {k: v.float() if torch.is_tensor(v) else v for k, v in extra.items()}
    y = forward(xr, ids, wr, weights[0].float(), weights[1].float(), gu, dn, **extra)
    y.backward(dy.float())
    out = {"y": y.detach(), "dx": xr.grad, "dw": wr.grad}
    for name, lora in (("gate_up", gu), ("down", dn)):
        if lora:
            out[f"{name}_A"], out[f"{name}_B"] = lora[0].grad, lora[1].grad
    return out


def rel_l2(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
