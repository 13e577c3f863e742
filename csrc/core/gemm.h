// GEMM on packed panels: a register-blocked vector micro-kernel behind a backend's matrix-tile unit, and the
// backward's product with transposed weights for few rows. Part of the numeric core; see kernel_impl.h.
#pragma once

#include "packing.h"

constexpr int kStreamAhead = 16;  // k-pairs (cache lines of a panel) a streaming GEMM prefetches ahead

// C[M][16*nblocks] (+)= A[M][K] * B, B packed with K (a multiple of 16) rows per panel; bstride = elements from
// one 16-column panel to the next. pf (or null): panels to prefetch into L2 meanwhile, one line per panel and step.
template <int M, int NV, class T>
inline void micro(const T* A, size_t lda, const T* B, size_t bstride, int kpairs, float* C, size_t ldc, bool acc,
                  const T* pf) {
  constexpr int P = Elem<T>::P;
  typename Ops::V c[M][NV];
#pragma GCC unroll 16
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) c[m][v] = acc ? Ops::load(C + m * ldc + v * kPanel) : Ops::zero();
  for (int kp = 0; kp < kpairs; ++kp) {
    if (pf)
      for (int v = 0; v < NV; ++v) __builtin_prefetch(pf + v * bstride + static_cast<size_t>(kp) * kPanel * P, 0, 2);
    decltype(Ops::load_b(B)) b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = Ops::load_b(B + v * bstride + static_cast<size_t>(kp) * kPanel * P);
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) {
      auto a = Ops::load_a(A + m * lda + kp * P);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[m][v] = Ops::madd(c[m][v], b[v], a);
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) Ops::store(C + m * ldc + v * kPanel, c[m][v]);
}

// f(std::integral_constant<int, n>{}) for the run-time n in 1 .. N: register-blocked kernels are instantiated for
// every block size they may meet.
template <int N, class F>
inline void with_size(int n, F&& f) {
  if constexpr (N > 0) {
    if (n == N) return f(std::integral_constant<int, N>{});
    with_size<N - 1>(n, f);
  }
}

template <class T>
inline void gemm(const T* A, size_t lda, int M, int K, const T* B, size_t bstride, int nblocks, float* C,
                 size_t ldc, bool acc) {
  constexpr int P = Elem<T>::P;
  const int kpairs = K / P;
  // A backend with matrix tiles computes the rows it takes; the vector micro-kernel does the rest.
  const int tiled = Ops::gemm_tiles(A, lda, M, K, B, bstride, nblocks, C, ldc, acc);
  for (int nb = 0; nb < nblocks; nb += Ops::NV) {
    const int nv = imin(Ops::NV, nblocks - nb);
    // With several row blocks, the first prefetches the next group of panels (when it is a whole one) for them
    // to find in L2. A single row block streams its panels from memory as it multiplies: it prefetches them
    // kStreamAhead k-pairs ahead, since the hardware prefetcher stops at every 4 KB page (measured on two Xeon
    // cores at qlen 128: the forward's gate_up phase took 13-22 % less).
    const T* pf = M - tiled > Ops::MR ? (nb + 2 * Ops::NV <= nblocks ? B + (nb + Ops::NV) * bstride : nullptr)
                                      : B + nb * bstride + static_cast<size_t>(kStreamAhead) * kPanel * P;
    for (int m = tiled; m < M; m += Ops::MR)
      with_size<Ops::NV>(nv, [&](auto v) {
        with_size<Ops::MR>(imin(Ops::MR, M - m), [&](auto rows) {
          micro<decltype(rows)::value, decltype(v)::value>(A + m * lda, lda, B + nb * bstride, bstride, kpairs,
                                                           C + m * ldc + nb * kPanel, ldc, acc,
                                                           m == tiled ? pf : nullptr);
        });
      });
  }
}

template <int M, int NV, class T>
inline void micro_transposed(const T* const* A, const T* const* W, int sources, size_t lda, int Np, int Kp, int k0,
                             float* C, size_t ldc) {
  constexpr int P = Elem<T>::P;
  const size_t wstride = static_cast<size_t>(Kp) * kPanel;
  typename Ops::V c[M][NV];
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < NV; ++v) c[m][v] = Ops::zero();
  alignas(64) T block[NV][kPanel * kPanel];
  for (int s = 0; s < sources; ++s) {
    const T* base = W[s] + static_cast<size_t>(k0) * kPanel;
    for (int nb = 0; nb < Np / kPanel; ++nb) {
      prefetch_ahead(base, nb, Np / kPanel, wstride, NV);
      for (int v = 0; v < NV; ++v) transposed_block(base + nb * wstride + v * kPanel * kPanel, block[v]);
      const T* a = A[s] + nb * kPanel;
      for (int kp = 0; kp < kPanel / P; ++kp) {
        decltype(Ops::load_b(block[0])) b[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) b[v] = Ops::load_b(block[v] + kp * kPanel * P);
#pragma GCC unroll 16
        for (int m = 0; m < M; ++m) {
          const auto av = Ops::load_a(a + m * lda + kp * P);
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) c[m][v] = Ops::madd(c[m][v], b[v], av);
        }
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < NV; ++v) Ops::store(C + m * ldc + v * kPanel, c[m][v]);
}

// The backward's product with transposed weights for at most Ops::MR rows: C[M][16 nblocks] = sum_s A_s W_s^T,
// columns c0 .. of the W_s (one or two sources, accumulated).
template <class T>
inline void gemm_transposed(const T* const* A, const T* const* W, int sources, size_t lda, int M, int Np, int Kp,
                            int c0, int nblocks, float* C, size_t ldc) {
  for (int nb = 0; nb < nblocks; nb += Ops::NV)
    with_size<Ops::NV>(imin(Ops::NV, nblocks - nb), [&](auto v) {
      with_size<Ops::MR>(M, [&](auto rows) {
        micro_transposed<decltype(rows)::value, decltype(v)::value>(A, W, sources, lda, Np, Kp, c0 + nb * kPanel,
                                                                    C + nb * kPanel, ldc);
      });
    });
}
