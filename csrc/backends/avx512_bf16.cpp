// AVX-512 BF16 backend (Zen 4/5, Cooper Lake and later; compiled with -mavx512f -mavx512bf16 ...): one
// vdpbf16ps multiplies 16 columns x 2 reduction values per instruction.
#include <immintrin.h>

#include "../plan.h"

namespace {
using namespace kt;

struct Ops {
  static constexpr int MR = 12, NV = 2;
  using V = __m512;

  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static __m512bh load_b(const bf16* p) { return (__m512bh)_mm512_loadu_si512(p); }
  static __m512 load_b(const float* p) { return _mm512_loadu_ps(p); }
  static __m512bh load_a(const bf16* p) {
    int32_t pair;
    std::memcpy(&pair, p, 4);
    return (__m512bh)_mm512_set1_epi32(pair);
  }
  static __m512 load_a(const float* p) { return _mm512_set1_ps(*p); }
  static V madd(V c, __m512bh b, __m512bh a) { return _mm512_dpbf16_ps(c, a, b); }
  static V madd(V c, __m512 b, __m512 a) { return _mm512_fmadd_ps(a, b, c); }
};

#include "../kernel_impl.h"
}  // namespace

namespace kt {
const Backend* backend_avx512_bf16() {
  static const Backend backend{"avx512_bf16", backend_pack, backend_forward_item, backend_backward_item};
  return &backend;
}
}  // namespace kt
