// The backward's work items, the LoRA factor gradients' outer products, and its phase table. Part of the numeric
// core; see kernel_impl.h.
#pragma once

#include "lora_layout.h"
#include "pass_common.h"

// outer_grad's operands: where the backend asks for them, pairs of bf16 rows (r, r + 1) in one multiply-add (half
// the multiply-adds of fp32 on a backend that multiplies pairs in one instruction), with the coefficients rounded
// to bf16 as a bf16 GEMM's operands are; elsewhere single rows widened to fp32.
template <class T>
constexpr bool kPairedRows = Elem<T>::P == 2 && Ops::kPairedOuterProducts;
template <class T>
using OuterT = std::conditional_t<kPairedRows<T>, T, float>;
template <class T>
constexpr int kRowsPerMadd = kPairedRows<T> ? 2 : 1;

// One register block of outer_grad: grad[j][i] (+)= sum_r scaled[r][j] * rows[r][i] for j < nj, i < ni, with the
// Q entries of a group of rows side by side and the groups ld apart. The rows' lines are prefetched kAhead rows
// ahead: rows a page or more apart are too many streams for the hardware prefetcher.
template <int J, int NC, class T>
inline void outer_grad_block(const OuterT<T>* scaled, int ld, const T* rows, size_t ldrows, int count, int nj, int ni,
                             float* grad, size_t gj, bool add) {
  using Outer = OuterT<T>;
  constexpr int Q = kRowsPerMadd<T>, kAhead = 16;
  typename Ops::V sum[J][NC];
  for (int jj = 0; jj < J; ++jj)
    for (int v = 0; v < NC; ++v) sum[jj][v] = Ops::zero();
  for (int r = 0; r < count; r += Q) {
    for (int q = 0; q < Q; ++q)
      if (r + q + kAhead < count)
        for (size_t off = 0; off < NC * kPanel * sizeof(T); off += 64)
          __builtin_prefetch(reinterpret_cast<const char*>(rows + (r + q + kAhead) * ldrows) + off);
    alignas(64) Outer operand[NC * kPanel * Q];  // rows r .. r + Q - 1 as one panel row
    const T* row = rows + r * ldrows;
    if constexpr (kPairedRows<T>) {  // 32-bit words, value 2l in the low half; an odd count's last row pairs with 0
      uint32_t words[NC * kPanel];
      if (r + 1 < count) {
        for (int l = 0; l < NC * kPanel; ++l) words[l] = row[l] | static_cast<uint32_t>(row[ldrows + l]) << 16;
      } else {
        for (int l = 0; l < NC * kPanel; ++l) words[l] = row[l];
      }
      std::memcpy(operand, words, sizeof words);
    } else {
      for (int l = 0; l < NC * kPanel; ++l) operand[l] = Elem<T>::to(row[l]);  // a vector conversion
    }
    decltype(Ops::load_b(operand)) b[NC];
    for (int v = 0; v < NC; ++v) b[v] = Ops::load_b(operand + v * kPanel * Q);
    const Outer* a = scaled + r / Q * ld;
    for (int jj = 0; jj < J; ++jj) {
      const auto av = Ops::load_a(a + jj * Q);
      for (int v = 0; v < NC; ++v) sum[jj][v] = Ops::madd(sum[jj][v], b[v], av);
    }
  }
  for (int jj = 0; jj < nj; ++jj) {
    float* g = grad + jj * gj;
    if (!add && ni == NC * kPanel) {
      for (int v = 0; v < NC; ++v) Ops::store(g + v * kPanel, sum[jj][v]);
      continue;
    }
    alignas(64) float sums[NC * kPanel];
    for (int v = 0; v < NC; ++v) Ops::store(sums + v * kPanel, sum[jj][v]);
    for (int l = 0; l < ni; ++l) g[l] = add ? g[l] + sums[l] : sums[l];
  }
}

// grad[j][i] (+)= scale * sum_r row_scale[r] * coef[r][j] * rows[r][i] for j < rank, i < n (grad rows gj apart;
// acc: add, else overwrite): a product reducing over the rows. For each chunk of rows, the scaled coefficients of
// all ranks (of a group of up to kGroup) are computed once into L1 as broadcast operands. Then for each vector block
// of columns, blocks of J ranks x NC vectors stay in registers while the chunk's rows stream past, Q at a time as
// one panel row; the rank blocks follow each other, so the rows' line is read from memory once. Rows are read in
// whole vectors (rows are padded past n to a multiple of kPad); only the n columns are written.
template <class T>
inline void outer_grad(const float* coef, int ldcoef, const float* row_scale, const T* rows, size_t ldrows,
                       int count, int rank, int n, float scale, float* grad, size_t gj, bool acc) {
  using Outer = OuterT<T>;
  constexpr int Q = kRowsPerMadd<T>;
  constexpr int J = 4 * Ops::NV, NC = Ops::NV, kScaled = 4096, kGroup = 64;  // kGroup: ranks per pass, J | kGroup
  alignas(64) Outer scaled[kScaled];  // [row / Q][ranks][row % Q]
  for (int g0 = 0; g0 < rank; g0 += kGroup) {
    const int group = imin(kGroup, rank - g0), ranks = static_cast<int>(round_up(group, J));
    const int chunk = imin(256, kScaled / ranks / Q * Q);  // rows
    for (int r0 = 0; r0 < count; r0 += chunk) {
      const int nr = imin(chunk, count - r0);
      const bool add = acc || r0 > 0;
      for (int r = 0; r < static_cast<int>(round_up(nr, Q)); ++r) {  // an odd count's padding row: zeros
        const bool live = r < nr;
        const float s = live ? (row_scale ? scale * row_scale[r0 + r] : scale) : 0.f;
        for (int j = 0; j < ranks; ++j)
          scaled[(r / Q * ranks + j) * Q + r % Q] =
              Elem<Outer>::from(live && j < group ? s * coef[(r0 + r) * ldcoef + g0 + j] : 0.f);
      }
      for (int i0 = 0; i0 < n; i0 += NC * kPanel)
        for (int j0 = 0; j0 < group; j0 += J)
          outer_grad_block<J, NC>(scaled + j0 * Q, ranks * Q, rows + r0 * ldrows + i0, ldrows, nr,
                                  imin(J, group - j0), imin(NC * kPanel, n - i0), grad + (g0 + j0) * gj + i0, gj,
                                  add);
    }
  }
}

inline size_t bwd_lora_layout_items(const Plan& p) { return p.lora_layout_ready ? 0 : lora_layout_items(p); }

template <class T>
inline void bwd_gather(const Plan& p, size_t item, int worker) {
  const Rows rows = expert_item(p, item);
  T* dY = static_cast<T*>(p.dY);
  gather_rows(p, p.dy, rows, dY);
  const int r2 = p.dn.rank, e = rows.e;
  if (r2 == 0) return;
  // bdy = dY Bd: Bd^T as a [r2][H] operand.
  T* pk = scratch_T<T>(p, worker);
  pack(p.dn_Bt + static_cast<size_t>(e) * r2 * p.H, DType::f32, p.H, 1, r2, p.H, pk);
  float* bdy = p.bdy + static_cast<size_t>(rows.begin) * p.r2p;
  for (int r0 = 0; r0 < rows.count; r0 += kRowChunk)
    gemm(dY + static_cast<size_t>(rows.begin + r0) * p.ldh, p.ldh, imin(kRowChunk, rows.count - r0), p.Hp, pk,
         static_cast<size_t>(p.Hp) * kPanel, panels(r2), bdy + static_cast<size_t>(r0) * p.r2p, p.r2p, false);
  scale_rows(bdy, rows.count, r2, p.r2p, p.dn.scaling,
             static_cast<T*>(p.bdy_s) + static_cast<size_t>(rows.begin) * p.r2p);
  // Ad^T as an [I][r2] operand for the dZ' items.
  pack(static_cast<const char*>(p.dn.A) + elem_offset(p.dn.dtype, static_cast<size_t>(e) * r2 * p.I), p.dn.dtype,
       1, p.I, p.I, r2, lora_pk<T>(p, e));
}

// Whether the backward's product with transposed weights for `count` rows (with no backward copy) transposes
// each block right before its multiply-adds (gemm_transposed) rather than into panels in scratch: for one row
// block on the vector unit.
inline bool transposes_as_used(bool copy, int count) {
  return !copy && !Ops::kTilesTakeAllRows && count <= Ops::MR;
}

// For rows row .. row + m - 1 and the columns c0 .. c0 + ncols of I block `block`, with dZ' in c (rows ld apart),
// while it is in cache: dG and dU, and the block's share of dw (<dZ', Z> of the row, summed by the lora_grads
// phase).
template <class T>
inline void activation_backward(const Plan& p, const float* c, int ld, size_t row, int m, int block, int c0,
                                int ncols) {
  const T* Z = static_cast<const T*>(p.Z);
  const T* zg = static_cast<const T*>(p.dz_dg);
  const T* zu = static_cast<const T*>(p.dz_du);
  T* dG = static_cast<T*>(p.dG);
  T* dU = static_cast<T*>(p.dU);
  const int blocks = p.column_blocks(p.Ip);
  for (int r = 0; r < m; ++r) {
    const size_t o = (row + r) * p.ldi + c0;
    const float* dz = c + r * ld;
    p.dw_parts[(row + r) * blocks + block] = dot(dz, Z + o, ncols);
    const float w = p.row_weight[row + r];
    for (int i = 0; i < ncols; ++i) {
      const float d = w * dz[i];
      dG[o + i] = Elem<T>::from(d * Elem<T>::to(zg[o + i]));
      dU[o + i] = Elem<T>::from(d * Elem<T>::to(zu[o + i]));
    }
  }
}

inline size_t bwd_down_items(const Plan& p) { return expert_block_items(p, p.Ip); }
template <class T>
inline void bwd_down(const Plan& p, size_t item, int worker) {
  const auto [rows, block] = block_item(p, item, p.Ip);
  const int c0 = block * p.col_block, ncols = imin(p.col_block, p.Ip - c0), nblocks = ncols / kPanel;
  const T* wd = w_ptr<T>(p.wd, p.w_d_stride, rows.e);
  const size_t pstride = static_cast<size_t>(p.Hp) * kPanel;
  // The backward copy's panels as they lie; else blocks transposed as they are used, or panels in scratch.
  const bool copy = p.wd_t != nullptr, few = transposes_as_used(copy, rows.count);
  T* scratch = scratch_T<T>(p, worker);
  if (!copy && !few) pack_transposed_panels(wd, p.Hp, p.Ip, c0, nblocks, pstride, scratch);
  float* c = scratch_f32<T>(p, worker, nblocks * pstride);
  const int ld = p.col_block;
  const T* panels = copy ? w_ptr<T>(p.wd_t, p.w_d_stride, rows.e) + (c0 / kPanel) * pstride : scratch;
  const size_t lstride = static_cast<size_t>(p.r2p) * kPanel;
  const T* la = p.dn.rank ? lora_pk<T>(p, rows.e) + (c0 / kPanel) * lstride : nullptr;
  const T* dY = static_cast<const T*>(p.dY);
  const T* bdy_s = static_cast<const T*>(p.bdy_s);
  for (int r0 = 0; r0 < rows.count; r0 += kRowChunk) {
    const int m = imin(kRowChunk, rows.count - r0);
    const size_t row = static_cast<size_t>(rows.begin + r0);
    const T* a = dY + row * p.ldh;
    if (few)
      gemm_transposed(&a, &wd, 1, p.ldh, m, p.Hp, p.Ip, c0, nblocks, c, ld);
    else
      gemm(a, p.ldh, m, p.Hp, panels, pstride, nblocks, c, ld, false);
    if (la) gemm(bdy_s + row * p.r2p, p.r2p, m, lora_depth<T>(p.dn.rank, p.r2p), la, lstride, nblocks, c, ld, true);
    activation_backward<T>(p, c, ld, row, m, block, c0, ncols);
  }
}

template <class T>
inline void bwd_lora_grads(const Plan& p, size_t item, int worker) {
  const Rows rows = expert_item(p, item);
  const T* Z = static_cast<const T*>(p.Z);
  const T* dG = static_cast<const T*>(p.dG);
  const T* dU = static_cast<const T*>(p.dU);
  const int blocks = p.column_blocks(p.Ip);
  for (int r = 0; r < rows.count; ++r) {
    const size_t row = static_cast<size_t>(rows.begin + r);
    float dwr = 0.f;
    for (int b = 0; b < blocks; ++b) dwr += p.dw_parts[row * blocks + b];
    if (p.d_bias) {  // the down bias is part of the expert output the routing weight scales
      const float* bd = p.d_bias + static_cast<size_t>(rows.e) * p.Hp;
      dwr += dot(bd, static_cast<const T*>(p.dY) + row * p.ldh, p.Hp);
    }
    p.dw[p.row_src[row]] = dwr;
  }
  const int e = rows.e;
  const float* wrow = p.row_weight + rows.begin;
  if (const int r2 = p.dn.rank) {
    const float* bdy = p.bdy + static_cast<size_t>(rows.begin) * p.r2p;
    const float* ad = p.ad + static_cast<size_t>(rows.begin) * p.r2p;
    // dAd[e*r2 + j][i] (+)= s2 sum_r w_r bdy[r][j] Z[r][i];
    // dBd[h][j*E + e] (via Gt[e][j][h]) = s2 sum_r w_r ad[r][j] dY[r][h]
    float* dA = p.dn_grad.A + static_cast<size_t>(e) * r2 * p.I;
    outer_grad(bdy, p.r2p, wrow, Z + static_cast<size_t>(rows.begin) * p.ldi, p.ldi, rows.count, r2, p.I,
               p.dn.scaling, dA, p.I, p.grad_accumulate);
    float* Gt = p.dn_Gt + static_cast<size_t>(e) * r2 * p.H;
    outer_grad(ad, p.r2p, wrow, static_cast<const T*>(p.dY) + static_cast<size_t>(rows.begin) * p.ldh, p.ldh,
               rows.count, r2, p.H, p.dn.scaling, Gt, p.H, false);
  }
  if (const int r1 = p.gu.rank) {
    // gbg = dG Bg + dU Bu (Bg^T, Bu^T as [r1][I] operands), then its scaled copy for the dX items.
    T* pkg = scratch_T<T>(p, worker);
    T* pku = pkg + packed_size(p.r1p, p.Ip);
    const float* Bt = p.gu_Bt + static_cast<size_t>(e) * r1 * 2 * p.I;
    pack(Bt, DType::f32, 2 * p.I, 1, r1, p.I, pkg);
    pack(Bt + p.I, DType::f32, 2 * p.I, 1, r1, p.I, pku);
    float* gbg = p.gbg + static_cast<size_t>(rows.begin) * p.r1p;
    const size_t pstride = static_cast<size_t>(p.Ip) * kPanel;
    for (int r0 = 0; r0 < rows.count; r0 += kRowChunk) {
      const int m = imin(kRowChunk, rows.count - r0);
      const size_t row = static_cast<size_t>(rows.begin + r0);
      gemm(dG + row * p.ldi, p.ldi, m, p.Ip, pkg, pstride, panels(r1), gbg + r0 * p.r1p, p.r1p, false);
      gemm(dU + row * p.ldi, p.ldi, m, p.Ip, pku, pstride, panels(r1), gbg + r0 * p.r1p, p.r1p, true);
    }
    scale_rows(gbg, rows.count, r1, p.r1p, p.gu.scaling,
               static_cast<T*>(p.gbg_s) + static_cast<size_t>(rows.begin) * p.r1p);
    const float* ag = p.ag + static_cast<size_t>(rows.begin) * p.r1p;
    // dAgu[e*r1 + j][h] (+)= s1 sum_r gbg[r][j] X[r][h];
    // dBgu[o][j*E + e] (via Gt[e][j][o]) = s1 sum_r ag[r][j] dG|dU[r][o]
    float* dA = p.gu_grad.A + static_cast<size_t>(e) * r1 * p.H;
    outer_grad(gbg, p.r1p, nullptr, static_cast<const T*>(p.X) + static_cast<size_t>(rows.begin) * p.ldh, p.ldh,
               rows.count, r1, p.H, p.gu.scaling, dA, p.H, p.grad_accumulate);
    float* Gt = p.gu_Gt + static_cast<size_t>(e) * r1 * 2 * p.I;
    outer_grad(ag, p.r1p, nullptr, dG + static_cast<size_t>(rows.begin) * p.ldi, p.ldi, rows.count, r1, p.I,
               p.gu.scaling, Gt, 2 * p.I, false);
    outer_grad(ag, p.r1p, nullptr, dU + static_cast<size_t>(rows.begin) * p.ldi, p.ldi, rows.count, r1, p.I,
               p.gu.scaling, Gt + p.I, 2 * p.I, false);
    // Agu^T as an [H][r1] operand for the dX items.
    pack(static_cast<const char*>(p.gu.A) + elem_offset(p.gu.dtype, static_cast<size_t>(e) * r1 * p.H),
         p.gu.dtype, 1, p.H, p.H, r1, lora_pk<T>(p, e));
  }
}

inline size_t bwd_gate_up_items(const Plan& p) { return expert_block_items(p, p.Hp); }
template <class T>
inline void bwd_gate_up(const Plan& p, size_t item, int worker) {
  const auto [rows, block] = block_item(p, item, p.Hp);
  const int c0 = block * p.col_block, ncols = imin(p.col_block, p.Hp - c0), nblocks = ncols / kPanel;
  const size_t pstride = static_cast<size_t>(p.Ip) * kPanel;
  const T* w[2] = {w_ptr<T>(p.wg, p.w_gu_stride, rows.e), w_ptr<T>(p.wu, p.w_gu_stride, rows.e)};
  // As in bwd_down.
  const bool copy = p.wg_t != nullptr, few = transposes_as_used(copy, rows.count);
  T* scratch = scratch_T<T>(p, worker);
  const size_t at = (c0 / kPanel) * pstride;
  const T* pg = copy ? w_ptr<T>(p.wg_t, p.w_gu_stride, rows.e) + at : scratch;
  const T* pu = copy ? w_ptr<T>(p.wu_t, p.w_gu_stride, rows.e) + at : scratch + nblocks * pstride;
  if (!copy && !few) {
    pack_transposed_panels(w[0], p.Ip, p.Hp, c0, nblocks, pstride, scratch);
    pack_transposed_panels(w[1], p.Ip, p.Hp, c0, nblocks, pstride, scratch + nblocks * pstride);
  }
  const size_t lstride = static_cast<size_t>(p.r1p) * kPanel;
  const T* la = p.gu.rank ? lora_pk<T>(p, rows.e) + (c0 / kPanel) * lstride : nullptr;
  const T* dG = static_cast<const T*>(p.dG);
  const T* dU = static_cast<const T*>(p.dU);
  const T* gbg_s = static_cast<const T*>(p.gbg_s);
  float* c = scratch_f32<T>(p, worker, 2 * static_cast<size_t>(nblocks) * pstride);
  const int ld = p.col_block;
  for (int r0 = 0; r0 < rows.count; r0 += kRowChunk) {
    const int m = imin(kRowChunk, rows.count - r0);
    const size_t row = static_cast<size_t>(rows.begin + r0);
    const T* a[2] = {dG + row * p.ldi, dU + row * p.ldi};
    if (few) {
      gemm_transposed(a, w, 2, p.ldi, m, p.Ip, p.Hp, c0, nblocks, c, ld);
    } else {
      gemm(a[0], p.ldi, m, p.Ip, pg, pstride, nblocks, c, ld, false);
      gemm(a[1], p.ldi, m, p.Ip, pu, pstride, nblocks, c, ld, true);
    }
    if (la) gemm(gbg_s + row * p.r1p, p.r1p, m, lora_depth<T>(p.gu.rank, p.r1p), la, lstride, nblocks, c, ld, true);
    for (int r = 0; r < m; ++r) {
      T* out = static_cast<T*>(p.rows_out) + static_cast<size_t>(p.row_src[row + r]) * p.Hp + c0;
      for (int j = 0; j < ncols; ++j) out[j] = Elem<T>::from(c[r * ld + j]);
    }
  }
}

template <class T>
inline void bwd_sum_slots(const Plan& p, size_t item, int worker) {
  reduce_slots<T>(p, item, p.dx, worker);
}

// The backward, phase by phase: LoRA B factors to expert-major (skipped when its forward's are still there); per
// expert, gather dY (and dY Bd); per (expert, I block), dZ' and the activation backward; per expert, dw, the down
// LoRA grads, dG Bg + dU Bu and the gate_up LoRA grads; per (expert, H block), dX; per token block, the sum over
// slots; the B gradients back to PEFT's layout. Each phase's item count sits beside the item function that decodes
// the same items.
template <class T>
constexpr Phase kBackwardPhases[] = {
    {"backward.0.lora_layout", bwd_lora_layout_items, lora_b_to_expert_major},
    {"backward.1.gather", expert_items, bwd_gather<T>},
    {"backward.2.down_activation", bwd_down_items, bwd_down<T>},
    {"backward.3.lora_grads", expert_items, bwd_lora_grads<T>},
    {"backward.4.gate_up", bwd_gate_up_items, bwd_gate_up<T>},
    {"backward.5.sum_slots", token_block_items, bwd_sum_slots<T>},
    {"backward.6.lora_grad_layout", lora_layout_items, lora_grad_b_to_peft},
};
