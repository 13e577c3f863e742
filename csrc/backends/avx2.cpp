// AVX2 + FMA backend (compiled with -mavx2 -mfma): bf16 pairs are widened to fp32 and multiplied with FMA.
#include <immintrin.h>

#include "../plan.h"

namespace {
using namespace kt;
#include "portable_extras.h"
#include "avx_extras.h"

struct Ops : AvxExtras {
  static constexpr int MR = 4, NV = 1;
  struct V {
    __m256 lo, hi;
  };
  struct PairRow {
    __m256 even_lo, odd_lo, even_hi, odd_hi;
  };
  struct Pair {
    __m256 even, odd;
  };

  static V zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  static V load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  static void store(float* p, const V& v) {
    _mm256_storeu_ps(p, v.lo);
    _mm256_storeu_ps(p + 8, v.hi);
  }
  // 8 pairs (32-bit words) -> even values shifted into the high half, odd values masked.
  static void widen(__m256i w, __m256& even, __m256& odd) {
    even = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
    odd = _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
  }
  static PairRow load_b(const bf16* p) {
    PairRow b;
    widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), b.even_lo, b.odd_lo);
    widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16)), b.even_hi, b.odd_hi);
    return b;
  }
  static V load_b(const float* p) { return load(p); }
  static Pair load_a(const bf16* p) {
    int32_t w;
    std::memcpy(&w, p, 4);
    Pair a;
    widen(_mm256_set1_epi32(w), a.even, a.odd);
    return a;
  }
  static __m256 load_a(const float* p) { return _mm256_broadcast_ss(p); }

  static V madd(V c, const PairRow& b, const Pair& a) {
    c.lo = _mm256_fmadd_ps(a.even, b.even_lo, _mm256_fmadd_ps(a.odd, b.odd_lo, c.lo));
    c.hi = _mm256_fmadd_ps(a.even, b.even_hi, _mm256_fmadd_ps(a.odd, b.odd_hi, c.hi));
    return c;
  }
  static V madd(V c, const V& b, __m256 a) {
    c.lo = _mm256_fmadd_ps(a, b.lo, c.lo);
    c.hi = _mm256_fmadd_ps(a, b.hi, c.hi);
    return c;
  }
};

#include "../kernel_impl.h"
}  // namespace

KT_DEFINE_BACKEND(avx2)
