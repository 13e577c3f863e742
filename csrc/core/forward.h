// The forward's work items and its phase table. Part of the numeric core; see kernel_impl.h.
#pragma once

#include "lora_layout.h"
#include "pass_common.h"

// exp with a Cephes-style polynomial (relative error ~1e-7): plain code the compiler vectorises for the ISA.
inline float fast_exp(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  float y = p * r * r + r + 1.f;
  return y * __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
}

template <class T>
inline void fwd_gather(const Plan& p, size_t item, int worker) {
  const Rows rows = expert_item(p, item);
  T* X = static_cast<T*>(p.X);
  gather_rows(p, p.x, rows, X);
  const int r1 = p.gu.rank;
  if (r1 == 0) return;
  const int e = rows.e;
  T* pkA = scratch_T<T>(p, worker);
  pack(static_cast<const char*>(p.gu.A) + elem_offset(p.gu.dtype, static_cast<size_t>(e) * r1 * p.H), p.gu.dtype,
       p.H, 1, r1, p.H, pkA);
  float* ag = p.ag + static_cast<size_t>(rows.begin) * p.r1p;
  for (int r0 = 0; r0 < rows.count; r0 += kRowChunk)
    gemm(X + static_cast<size_t>(rows.begin + r0) * p.ldh, p.ldh, imin(kRowChunk, rows.count - r0), p.Hp, pkA,
         static_cast<size_t>(p.Hp) * kPanel, panels(r1), ag + static_cast<size_t>(r0) * p.r1p, p.r1p, false);
  scale_rows(ag, rows.count, r1, p.r1p, p.gu.scaling,
             static_cast<T*>(p.ag_s) + static_cast<size_t>(rows.begin) * p.r1p);
  // Bg and Bu of this expert as [I][r1] operands for the gate/up items.
  T* pk = lora_pk<T>(p, e);
  const float* Bt = p.gu_Bt + static_cast<size_t>(e) * r1 * 2 * p.I;
  pack(Bt, DType::f32, 1, 2 * p.I, p.I, r1, pk);
  pack(Bt + p.I, DType::f32, 1, 2 * p.I, p.I, r1, pk + packed_size(p.I, r1));
}


inline size_t fwd_gate_up_items(const Plan& p) { return expert_block_items(p, p.Ip); }
template <class T>
inline void fwd_gate_up(const Plan& p, size_t item, int worker) {
  const auto [rows, block] = block_item(p, item, p.Ip);
  const int c0 = block * p.col_block, ncols = imin(p.col_block, p.Ip - c0), nblocks = ncols / kPanel;
  const size_t wstride = static_cast<size_t>(p.Hp) * kPanel;
  const T* wg = w_ptr<T>(p.wg, p.w_gu_stride, rows.e) + (c0 / kPanel) * wstride;
  const T* wu = w_ptr<T>(p.wu, p.w_gu_stride, rows.e) + (c0 / kPanel) * wstride;
  const T* X = static_cast<const T*>(p.X);
  const T* ag_s = static_cast<const T*>(p.ag_s);
  const size_t lstride = static_cast<size_t>(p.r1p) * kPanel;
  const T* lg = p.gu.rank ? lora_pk<T>(p, rows.e) + (c0 / kPanel) * lstride : nullptr;
  const T* lu = p.gu.rank ? lg + packed_size(p.I, p.gu.rank) : nullptr;
  float* cg = scratch_f32<T>(p, worker, 0);
  float* cu = cg + kRowChunk * p.col_block;
  T* Z = static_cast<T*>(p.Z);
  T* zg = static_cast<T*>(p.dz_dg);
  T* zu = static_cast<T*>(p.dz_du);
  const int ld = p.col_block;
  for (int r0 = 0; r0 < rows.count; r0 += kRowChunk) {
    const int m = imin(kRowChunk, rows.count - r0);
    const size_t row = static_cast<size_t>(rows.begin + r0);
    gemm(X + row * p.ldh, p.ldh, m, p.Hp, wg, wstride, nblocks, cg, ld, false);
    gemm(X + row * p.ldh, p.ldh, m, p.Hp, wu, wstride, nblocks, cu, ld, false);
    if (lg) {
      gemm(ag_s + row * p.r1p, p.r1p, m, lora_depth<T>(p.gu.rank, p.r1p), lg, lstride, nblocks, cg, ld, true);
      gemm(ag_s + row * p.r1p, p.r1p, m, lora_depth<T>(p.gu.rank, p.r1p), lu, lstride, nblocks, cu, ld, true);
    }
    const float* bg = p.gu_bias ? p.gu_bias + static_cast<size_t>(rows.e) * 2 * p.Ip + c0 : nullptr;
    for (int r = 0; r < m; ++r) {
      const size_t o = (row + r) * p.ldi + c0;
      float* g = cg + r * ld;
      float* u = cu + r * ld;
      if (bg)
        for (int c = 0; c < ncols; ++c) {
          g[c] += bg[c];
          u[c] += bg[p.Ip + c];
        }
      // z and, for the backward, its exact fp32 derivatives (clamp masks decided on fp32 values, not on rounded
      // saved pre-activations, which would flip them near the limits).
      if (p.act == Activation::swiglu) {
        for (int c = 0; c < ncols; ++c) {
          const float s = 1.f / (1.f + fast_exp(-g[c]));
          const float silu = g[c] * s;
          Z[o + c] = Elem<T>::from(silu * u[c]);
          g[c] = u[c] * s * (1.f + g[c] * (1.f - s));
          u[c] = silu;
        }
      } else {
        const float alpha = p.alpha, limit = p.limit;
        for (int c = 0; c < ncols; ++c) {
          const float gc = g[c] < limit ? g[c] : limit;
          const float uc = u[c] < -limit ? -limit : (u[c] > limit ? limit : u[c]);
          const float s = 1.f / (1.f + fast_exp(-alpha * gc));
          Z[o + c] = Elem<T>::from((uc + 1.f) * gc * s);
          const float du = u[c] >= -limit && u[c] <= limit ? gc * s : 0.f;  // clamps pass the gradient inside
          g[c] = g[c] <= limit ? (uc + 1.f) * s * (1.f + alpha * gc * (1.f - s)) : 0.f;  // their closed interval
          u[c] = du;
        }
      }
      if (p.save)
        for (int c = 0; c < ncols; ++c) {
          zg[o + c] = Elem<T>::from(g[c]);
          zu[o + c] = Elem<T>::from(u[c]);
        }
    }
  }
}

inline size_t fwd_down_lora_items(const Plan& p) { return p.dn.rank ? expert_items(p) : 0; }
template <class T>
inline void fwd_down_lora(const Plan& p, size_t item, int worker) {
  const Rows rows = expert_item(p, item);
  const int r2 = p.dn.rank, e = rows.e;
  T* pkA = scratch_T<T>(p, worker);
  pack(static_cast<const char*>(p.dn.A) + elem_offset(p.dn.dtype, static_cast<size_t>(e) * r2 * p.I), p.dn.dtype,
       p.I, 1, r2, p.I, pkA);
  const T* Z = static_cast<const T*>(p.Z);
  float* ad = p.ad + static_cast<size_t>(rows.begin) * p.r2p;
  for (int r0 = 0; r0 < rows.count; r0 += kRowChunk)
    gemm(Z + static_cast<size_t>(rows.begin + r0) * p.ldi, p.ldi, imin(kRowChunk, rows.count - r0), p.Ip, pkA,
         static_cast<size_t>(p.Ip) * kPanel, panels(r2), ad + static_cast<size_t>(r0) * p.r2p, p.r2p, false);
  scale_rows(ad, rows.count, r2, p.r2p, p.dn.scaling,
             static_cast<T*>(p.ad_s) + static_cast<size_t>(rows.begin) * p.r2p);
  pack(p.dn_Bt + static_cast<size_t>(e) * r2 * p.H, DType::f32, 1, p.H, p.H, r2, lora_pk<T>(p, e));
}

inline size_t fwd_down_items(const Plan& p) { return expert_block_items(p, p.Hp); }
template <class T>
inline void fwd_down(const Plan& p, size_t item, int worker) {
  const auto [rows, block] = block_item(p, item, p.Hp);
  const int c0 = block * p.col_block, ncols = imin(p.col_block, p.Hp - c0), nblocks = ncols / kPanel;
  const size_t wstride = static_cast<size_t>(p.Ip) * kPanel;
  const T* wd = w_ptr<T>(p.wd, p.w_d_stride, rows.e) + (c0 / kPanel) * wstride;
  const size_t lstride = static_cast<size_t>(p.r2p) * kPanel;
  const T* ld_pk = p.dn.rank ? lora_pk<T>(p, rows.e) + (c0 / kPanel) * lstride : nullptr;
  const T* Z = static_cast<const T*>(p.Z);
  const T* ad_s = static_cast<const T*>(p.ad_s);
  float* c = scratch_f32<T>(p, worker, 0);
  const int ld = p.col_block;
  for (int r0 = 0; r0 < rows.count; r0 += kRowChunk) {
    const int m = imin(kRowChunk, rows.count - r0);
    const size_t row = static_cast<size_t>(rows.begin + r0);
    gemm(Z + row * p.ldi, p.ldi, m, p.Ip, wd, wstride, nblocks, c, ld, false);
    if (ld_pk)
      gemm(ad_s + row * p.r2p, p.r2p, m, lora_depth<T>(p.dn.rank, p.r2p), ld_pk, lstride, nblocks, c, ld, true);
    const float* bd = p.d_bias ? p.d_bias + static_cast<size_t>(rows.e) * p.Hp + c0 : nullptr;
    for (int r = 0; r < m; ++r) {
      const float w = p.row_weight[row + r];
      T* out = static_cast<T*>(p.rows_out) + static_cast<size_t>(p.row_src[row + r]) * p.Hp + c0;
      const float* src = c + r * ld;
      if (bd) {
        for (int j = 0; j < ncols; ++j) out[j] = Elem<T>::from(w * (src[j] + bd[j]));
      } else {
        for (int j = 0; j < ncols; ++j) out[j] = Elem<T>::from(w * src[j]);
      }
    }
  }
}

template <class T>
inline void fwd_sum_slots(const Plan& p, size_t item, int worker) {
  reduce_slots<T>(p, item, p.y, worker);
}

// The forward, phase by phase: LoRA B factors to expert-major; per expert, gather X (and X Agu^T); per (expert, I
// block), gate and up and the activation; per expert, Z Ad^T; per (expert, H block), down; per token block, the sum
// over slots. Each phase's item count sits beside the item function that decodes the same items.
template <class T>
constexpr Phase kForwardPhases[] = {
    {"forward.0.lora_layout", lora_layout_items, lora_b_to_expert_major},
    {"forward.1.gather", expert_items, fwd_gather<T>},
    {"forward.2.gate_up", fwd_gate_up_items, fwd_gate_up<T>},
    {"forward.3.down_lora", fwd_down_lora_items, fwd_down_lora<T>},
    {"forward.4.down", fwd_down_items, fwd_down<T>},
    {"forward.5.sum_slots", token_block_items, fwd_sum_slots<T>},
};
