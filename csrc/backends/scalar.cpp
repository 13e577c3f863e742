// Portable backend: plain C++ vector operations, compiled for the baseline ISA. It also documents the contract
// every backend's `Ops` fulfils for kernel_impl.h:
//   MR, NV             register block: MR rows x NV 16-column vectors of fp32 accumulators
//   V                  16 fp32 accumulators; zero(), load(const float*), store(float*, V)
//   load_b(const T*)   one packed panel row: 16 columns x P values of the reduction dimension
//   load_a(const T*)   P consecutive values of one A row, broadcast
//   madd(V, b, a)      V[c] += sum_p a[p] * b[c][p]
//   gemm_tiles(...)    rows a matrix-tile unit computes itself (the first ones), returning how many; 0 if none
//   kTilesTakeAllRows  gemm_tiles computes every bf16 row: the backward then packs transposed panels for it even
//                      for a few rows, instead of multiplying transposed blocks on the vector unit as it makes them
//   kPairedOuterProducts   the LoRA gradients' outer products multiply bf16 row pairs with madd (half the
//                      multiply-adds where that is one instruction) rather than rows widened to fp32
//   transpose_words(src, out)   out[q][kp] = src[kp][q] for 8 x 8 64-bit words, middle 16-bit halves swapped in
//                      each (the backward's transposed bf16 panels); false: use the portable loop
//   transpose_floats(src, ls, dst, ld)   dst[c * ld + r] = src[r * ls + c] for r, c < 8 (the LoRA B factors between
//                      PEFT's layout and expert-major); false: use the portable loop
#include "../plan.h"

namespace {
using namespace kt;
#include "portable_extras.h"

struct Ops : PortableExtras {
  static constexpr int MR = 4, NV = 1;
  // The AVX-512 backends' paired path, taken here too so that every machine runs (and so tests) it; the multiply-adds
  // are as many here either way.
  static constexpr bool kPairedOuterProducts = true;
  struct V {
    float v[kPanel];
  };
  struct PairRow {  // a bf16 panel row widened: even and odd reduction index
    float even[kPanel], odd[kPanel];
  };
  struct Pair {
    float even, odd;
  };

  static V zero() { return V{}; }
  static V load(const float* p) {
    V r;
    std::memcpy(r.v, p, sizeof r.v);
    return r;
  }
  static void store(float* p, const V& r) { std::memcpy(p, r.v, sizeof r.v); }

  static PairRow load_b(const bf16* p) {
    PairRow b;
    for (int i = 0; i < kPanel; ++i) {
      b.even[i] = bf16_to_f32(p[2 * i]);
      b.odd[i] = bf16_to_f32(p[2 * i + 1]);
    }
    return b;
  }
  static V load_b(const float* p) { return load(p); }
  static Pair load_a(const bf16* p) { return {bf16_to_f32(p[0]), bf16_to_f32(p[1])}; }
  static float load_a(const float* p) { return *p; }

  static V madd(V c, const PairRow& b, const Pair& a) {
    for (int i = 0; i < kPanel; ++i) c.v[i] += a.even * b.even[i] + a.odd * b.odd[i];
    return c;
  }
  static V madd(V c, const V& b, float a) {
    for (int i = 0; i < kPanel; ++i) c.v[i] += a * b.v[i];
    return c;
  }
};

#include "../kernel_impl.h"
}  // namespace

KT_DEFINE_BACKEND(scalar)
