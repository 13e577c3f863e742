// What the forward's and the backward's work items share: which rows and columns an item covers, the per-worker
// scratch and its size, the packed LoRA operands, and the gather of token rows and the sum over slots that the passes
// start and end with. Part of the numeric core; see kernel_impl.h.
#pragma once

#include "gemm.h"

constexpr int kRowChunk = 240;  // rows per GEMM call: bounds scratch, a multiple of every Ops::MR

// ------------------------------------------------------------------------------------------- work items
// A phase's items are counted and decoded by one of these pairs: per expert with rows, per (expert with rows, block
// of col_block columns), per block of 16 tokens.
struct Rows {
  int e, begin, count;  // expert e's rows begin .. begin + count - 1
};
inline Rows expert_rows(const Plan& p, int e) {
  return {e, static_cast<int>(p.offsets[e]), static_cast<int>(p.offsets[e + 1] - p.offsets[e])};
}

inline size_t expert_items(const Plan& p) { return static_cast<size_t>(p.active_count); }
inline Rows expert_item(const Plan& p, size_t item) { return expert_rows(p, p.active[item]); }

struct BlockItem {
  Rows rows;
  int block;
};
inline size_t expert_block_items(const Plan& p, int cols) {
  return static_cast<size_t>(p.active_count) * p.column_blocks(cols);
}
inline BlockItem block_item(const Plan& p, size_t item, int cols) {
  const size_t blocks = static_cast<size_t>(p.column_blocks(cols));
  return {expert_rows(p, p.active[item / blocks]), static_cast<int>(item % blocks)};
}

inline size_t token_block_items(const Plan& p) { return (static_cast<size_t>(p.T) + 15) / 16; }

// ------------------------------------------------------------------------------------------- memory
template <class T>
inline const T* w_ptr(const void* base, size_t stride, int e) { return static_cast<const T*>(base) + e * stride; }
inline size_t elem_offset(DType dt, size_t n) { return n * (dt == DType::bf16 ? 2 : 4); }

// Expert e's packed LoRA operands, made by the per-expert phases for the column-block phases after them: forward
// Bg^T and Bu^T [I][r1] (gather, for gate_up) and Bd^T [H][r2] (down_lora, for down); backward Ad^T [I][r2]
// (gather, for down_activation) and Agu^T [H][r1] (lora_grads, for gate_up).
inline size_t lora_operand_elems(const Plan& p) {
  return std::max({2 * static_cast<size_t>(p.Ip) * p.r1p, static_cast<size_t>(p.Hp) * p.r2p,
                   static_cast<size_t>(p.Ip) * p.r2p, static_cast<size_t>(p.Hp) * p.r1p});
}
template <class T>
inline T* lora_pk(const Plan& p, int e) { return static_cast<T*>(p.lora_pk) + e * p.lora_pk_stride; }

// Each worker's scratch: an area of T, for the operands an item packs (scratch_T), then an fp32 area for its GEMM
// outputs and sums (scratch_f32, after the packed operands it skips).
template <class T>
inline T* scratch_T(const Plan& p, int worker) {
  return reinterpret_cast<T*>(p.scratch + static_cast<size_t>(worker) * p.scratch_bytes);
}
template <class T>
inline float* scratch_f32(const Plan& p, int worker, size_t skip_T) {
  return reinterpret_cast<float*>(p.scratch + static_cast<size_t>(worker) * p.scratch_bytes +
                                  round_up(skip_T * sizeof(T), 64));
}
// The bytes scratch_T and scratch_f32 reach over every item of both passes, for a plan's sizes and LoRA ranks.
template <class T>
inline size_t scratch_bytes(const Plan& p) {
  const size_t Hp = p.Hp, Ip = p.Ip, r1p = p.r1p, r2p = p.r2p, cb = p.col_block;
  const size_t packed = std::max({
      r1p * Hp,     // forward gather: Agu
      r2p * Ip,     // forward down_lora: Ad
      r2p * Hp,     // backward gather: Bd^T
      cb * Hp,      // backward down_activation: the transposed down panels of one column block
      2 * r1p * Ip, // backward lora_grads: Bg^T and Bu^T
      2 * cb * Ip,  // backward gate_up: the transposed gate and up panels of one column block
  });
  const size_t f32 = std::max({
      2 * static_cast<size_t>(kRowChunk) * cb,  // forward gate_up: gate and up outputs of a row chunk (others: one)
      Hp,                                       // sum over slots: one token's row
  });
  return round_up(round_up(packed * sizeof(T), 64) + f32 * sizeof(float), 4096);
}

// The reduction depth of a product with a scaled LoRA intermediate (rank values of rp, the rest zeros): the vector
// micro-kernel needs whole k-pairs only (rank 8 padded to 32 would be 4x the multiply-adds), a tile unit 32-deep steps.
template <class T>
inline int lora_depth(int rank, int rp) {
  constexpr int P = Elem<T>::P;
  return Ops::kTilesTakeAllRows && P == 2 ? rp : static_cast<int>(round_up(rank, P));
}

// sum_i a[i] b[i] for n a multiple of 16, in 16 partial sums: a reduction the compiler vectorises without
// reassociating.
template <class T>
inline float dot(const float* a, const T* b, int n) {
  float lanes[kPanel] = {};
  for (int i = 0; i < n; i += kPanel)
    for (int l = 0; l < kPanel; ++l) lanes[l] += a[i + l] * Elem<T>::to(b[i + l]);
  float sum = 0.f;
  for (int l = 0; l < kPanel; ++l) sum += lanes[l];
  return sum;
}

// dst[r][0:rp] = T(scale * src[r][0:rank]), zero padded: the scaled LoRA intermediate as a GEMM operand.
template <class T>
inline void scale_rows(const float* src, int rows, int rank, int rp, float scale, T* dst) {
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < rp; ++j) dst[r * rp + j] = Elem<T>::from(j < rank ? scale * src[r * rp + j] : 0.f);
}

// Gather rows of an io tensor [T][H] for slots row_src into dst [rows][Hp] (zero padded).
template <class T>
inline void gather_rows(const Plan& p, const void* src, const Rows& rows, T* dst) {
  constexpr int P = Elem<T>::P;
  for (int r = 0; r < rows.count; ++r) {
    const size_t t = static_cast<size_t>(p.row_src[rows.begin + r] / p.k);
    T* out = dst + static_cast<size_t>(rows.begin + r) * p.ldh;
    if (p.io == DType::bf16 && P == 2) {
      std::memcpy(out, static_cast<const bf16*>(src) + t * p.H, sizeof(T) * p.H);
    } else {
      for (int h = 0; h < p.H; ++h) out[h] = Elem<T>::from(load_io(src, p.io, t * p.H + h));
    }
    for (int h = p.H; h < p.Hp; ++h) out[h] = Elem<T>::from(0.f);
  }
}

// out[t] = sum_j rows_out[t*k + j] for one block of 16 tokens, over the slots present (a skipped slot, id -1, is
// computed by another executor tier and left out; a token with every slot skipped sums to 0).
template <class T>
inline void reduce_slots(const Plan& p, size_t block, void* out, int worker) {
  const int t0 = static_cast<int>(block) * 16, t1 = imin(p.T, t0 + 16);
  float* acc = scratch_f32<T>(p, worker, 0);
  for (int t = t0; t < t1; ++t) {
    const T* src = static_cast<const T*>(p.rows_out) + static_cast<size_t>(t) * p.k * p.Hp;
    const uint8_t* present = p.slot_present ? p.slot_present + static_cast<size_t>(t) * p.k : nullptr;
    int j = 0;
    while (present && j < p.k && !present[j]) ++j;
    if (j == p.k) {
      for (int h = 0; h < p.H; ++h) acc[h] = 0.f;
    } else {
      for (int h = 0; h < p.H; ++h) acc[h] = Elem<T>::to(src[static_cast<size_t>(j) * p.Hp + h]);
    }
    for (++j; j < p.k; ++j)
      if (!present || present[j])
        for (int h = 0; h < p.H; ++h) acc[h] += Elem<T>::to(src[static_cast<size_t>(j) * p.Hp + h]);
    if (p.io == DType::bf16) {
      bf16* o = static_cast<bf16*>(out) + static_cast<size_t>(t) * p.H;
      for (int h = 0; h < p.H; ++h) o[h] = f32_to_bf16(acc[h]);
    } else {
      std::memcpy(static_cast<float*>(out) + static_cast<size_t>(t) * p.H, acc, sizeof(float) * p.H);
    }
  }
}
