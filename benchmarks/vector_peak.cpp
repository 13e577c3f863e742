// Register-only throughput of vdpbf16ps zmm and vfmadd231ps zmm (24 independent accumulators), 1 and 2 threads:
// the arithmetic ceiling the kernel benchmark's GFLOP/s compare with on an AVX-512 BF16 CPU.
//   g++ -O2 -mavx512f -mavx512bf16 -pthread benchmarks/vector_peak.cpp -o /tmp/vector_peak && taskset -c 0,1 /tmp/vector_peak
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>
template <bool BF16>
float run(long iters) {
  __m512 c[24];
  for (int i = 0; i < 24; ++i) c[i] = _mm512_set1_ps(i * 1e-3f);
  const __m512 a = _mm512_set1_ps(1.0001f), b = _mm512_set1_ps(0.9999f);
  const __m512bh ab = (__m512bh)_mm512_set1_epi32(0x3f803f80), bb = (__m512bh)_mm512_set1_epi32(0x3f803f80);
  for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 24
    for (int m = 0; m < 24; ++m) {
      if constexpr (BF16) c[m] = _mm512_dpbf16_ps(c[m], ab, bb);
      else c[m] = _mm512_fmadd_ps(a, b, c[m]);
    }
    __asm__ volatile("" : "+v"(c[0]), "+v"(c[1]), "+v"(c[2]), "+v"(c[3]));
  }
  float s = 0; for (int i = 0; i < 24; ++i) s += _mm512_reduce_add_ps(c[i]);
  return s;
}
int main() {
  const long iters = 40000000;
  for (int kind = 0; kind < 2; ++kind)
    for (int threads : {1, 2}) {
      auto t0 = std::chrono::steady_clock::now();
      std::vector<std::thread> ts; std::vector<float> out(threads);
      for (int t = 0; t < threads; ++t) ts.emplace_back([&, t] { out[t] = kind ? run<false>(iters) : run<true>(iters); });
      for (auto& t : ts) t.join();
      double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const double flops_per = kind ? 32 : 64;
      printf("%s threads %d: %.1f GFLOP/s per core, %.2f instr/ns/core (%g)\n", kind ? "vfmadd231ps zmm" : "vdpbf16ps zmm  ",
             threads, iters * 24.0 * flops_per / s / 1e9, iters * 24.0 / s / 1e9, out[0]);
    }
}
