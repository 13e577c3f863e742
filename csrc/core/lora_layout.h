// The LoRA B factors between PEFT's layout and expert-major, both ways: the first phase of each pass moves the
// factors in, the backward's last moves their gradients back. Part of the numeric core; see kernel_impl.h.
#pragma once

#include "packing.h"

// PEFT's B [out][E*r] has rank-major columns (j*E + e), so one expert's factor is spread over the whole matrix.
// Items: blocks of 16 rows of gate_up's B, then of down's; each moves its rows between B and Bt [E][r][out] (fp32)
// in 8 x 8 tiles (8 rows x 8 experts), so that both sides are read and written in runs.
inline int lora_row_blocks(int out, int rank) { return rank ? (out + 15) / 16 : 0; }
inline size_t lora_layout_items(const Plan& p) {
  return static_cast<size_t>(lora_row_blocks(2 * p.I, p.gu.rank) + lora_row_blocks(p.H, p.dn.rank));
}

// Row of the gate-block-then-up-block order for row o of an interleaved (gate, up, gate, up, ...) gate_up.
inline int gate_up_row(const Plan& p, int o) { return (o & 1) ? p.I + o / 2 : o / 2; }

// The rows of one item: which factor, and two groups of up to 8 rows of B that are 8 consecutive entries of a Bt
// row: rows o0 .. o0 + 7 and o0 + 8 .. o0 + 15, or for an interleaved (gate, up, gate, up, ...) gate_up the even
// rows, which are gate's, and the odd ones, up's.
struct RowGroup {
  int first, step, count, to;  // B rows first + i * step (i < count) are Bt entries to + i
};
struct LoraBlock {
  bool gu;
  int rank, out, o0;
  RowGroup groups[2];
};
inline LoraBlock lora_block(const Plan& p, size_t item) {
  const int gu_blocks = lora_row_blocks(2 * p.I, p.gu.rank);
  LoraBlock b;
  b.gu = static_cast<int>(item) < gu_blocks;
  b.rank = b.gu ? p.gu.rank : p.dn.rank;
  b.out = b.gu ? 2 * p.I : p.H;
  b.o0 = 16 * (b.gu ? static_cast<int>(item) : static_cast<int>(item) - gu_blocks);
  const bool interleaved = b.gu && p.gu_interleaved;
  const int end = imin(b.out, b.o0 + 16);
  for (int h = 0; h < 2; ++h) {
    RowGroup& g = b.groups[h];
    g.first = b.o0 + (interleaved ? h : 8 * h);
    g.step = interleaved ? 2 : 1;
    g.count = end > g.first ? imin(8, (end - g.first + g.step - 1) / g.step) : 0;
    g.to = interleaved ? gate_up_row(p, g.first) : g.first;
  }
  return b;
}


// Bt[e][j][g.to + i] = B[g.first + i * g.step][j*E + e] for the rows of one block. The tiles go through L1 so that
// each expert's entries from both groups are stored back to back: its whole 64-byte run in one go.
template <class S>
inline void copy_b_block(const LoraBlock& b, const S* B, int E, float* Bt) {
  const size_t cols = static_cast<size_t>(E) * b.rank;
  for (int j = 0; j < b.rank; ++j)
    for (int e0 = 0; e0 < E; e0 += 8) {
      const int ne = imin(8, E - e0);
      float runs[2][8][8];  // [group][expert][row of the group]
      for (int h = 0; h < 2; ++h) {
        const RowGroup& g = b.groups[h];
        if (!g.count) continue;  // the second group of a last block of at most 8 rows
        const S* src = B + static_cast<size_t>(g.first) * cols + static_cast<size_t>(j) * E + e0;
        if constexpr (std::is_same_v<S, float>) {
          transpose_tile(src, g.step * cols, g.count, ne, runs[h][0], 8);
        } else {  // the conversion transposes as it goes
          for (int i = 0; i < g.count; ++i)
            for (int c = 0; c < ne; ++c) runs[h][c][i] = Elem<S>::to(src[i * g.step * cols + c]);
        }
      }
      for (int c = 0; c < ne; ++c) {
        float* dst = Bt + (static_cast<size_t>(e0 + c) * b.rank + j) * b.out;
        for (int h = 0; h < 2; ++h) {
          const RowGroup& g = b.groups[h];
          if (g.count == 8) {
            std::memcpy(dst + g.to, runs[h][c], sizeof runs[h][c]);  // a fixed size: two vector stores, no call
          } else {
            for (int i = 0; i < g.count; ++i) dst[g.to + i] = runs[h][c][i];
          }
        }
      }
    }
}

inline void lora_b_to_expert_major(const Plan& p, size_t item, int /*worker*/) {
  const LoraBlock b = lora_block(p, item);
  const LoraRef& l = b.gu ? p.gu : p.dn;
  float* Bt = b.gu ? p.gu_Bt : p.dn_Bt;
  if (l.dtype == DType::bf16)
    copy_b_block(b, static_cast<const bf16*>(l.B), p.E, Bt);
  else
    copy_b_block(b, static_cast<const float*>(l.B), p.E, Bt);
}

// The reverse for the B gradients of the experts that had rows: grad[o][j*E + e] += Gt[e][j][o]. When
// overwriting, grad[o][j*E + e] = Gt[e][j][o] or 0 for an expert without rows, and row block b of a factor's B
// also zeroes that factor's A gradient rows of the experts without rows among e = b, b + blocks, ...
inline void lora_grad_b_to_peft(const Plan& p, size_t item, int /*worker*/) {
  const LoraBlock b = lora_block(p, item);
  const float* Gt = b.gu ? p.gu_Gt : p.dn_Gt;
  const size_t cols = static_cast<size_t>(p.E) * b.rank, ldt = static_cast<size_t>(b.rank) * b.out;
  float* grad = b.gu ? p.gu_grad.B : p.dn_grad.B;
  for (int j = 0; j < b.rank; ++j)
    for (int e0 = 0; e0 < p.E; e0 += 8) {
      const int ne = imin(8, p.E - e0);
      bool had_rows[8];  // Gt of the others is stale: transposed with the rest, never used
      for (int c = 0; c < ne; ++c) had_rows[c] = p.offsets[e0 + c + 1] > p.offsets[e0 + c];
      for (const RowGroup& g : b.groups) {
        if (!g.count) continue;
        float tile[8][8];  // [row of the group][expert]
        transpose_tile(Gt + (static_cast<size_t>(e0) * b.rank + j) * b.out + g.to, ldt, ne, g.count, tile[0], 8);
        for (int i = 0; i < g.count; ++i) {
          float* dst = grad + static_cast<size_t>(g.first + i * g.step) * cols + static_cast<size_t>(j) * p.E + e0;
          if (p.grad_accumulate) {
            for (int c = 0; c < ne; ++c)
              if (had_rows[c]) dst[c] += tile[i][c];
          } else {
            for (int c = 0; c < ne; ++c) dst[c] = had_rows[c] ? tile[i][c] : 0.f;
          }
        }
      }
    }
  if (p.grad_accumulate) return;
  const int blocks = lora_row_blocks(b.out, b.rank), block = b.o0 / 16;
  const size_t in = b.gu ? p.H : p.I;
  float* gradA = b.gu ? p.gu_grad.A : p.dn_grad.A;
  for (int e = block; e < p.E; e += blocks)
    if (p.offsets[e + 1] == p.offsets[e]) std::memset(gradA + e * b.rank * in, 0, sizeof(float) * b.rank * in);
}
