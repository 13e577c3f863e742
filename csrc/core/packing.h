// Packing: a logical W[N][K] into the 16-column panels the GEMMs read (layout in plan.h), and the transposed
// panels of W^T that the backward makes from W's panels. Part of the numeric core; see kernel_impl.h.
#pragma once

inline size_t packed_size(int N, int K) { return round_up(N, kPad) * round_up(K, kPad); }
inline int panels(int N) { return (N + kPanel - 1) / kPanel; }  // the panels a GEMM with N outputs computes

// dst[c * ld + r] = src[r * ls + c] for r < rows, c < cols (8 at most), of 32-bit values: fp32, or the bf16 pairs
// of packed panels, which the portable loop copies as bytes.
inline void transpose_tile(const float* src, size_t ls, int rows, int cols, float* dst, size_t ld) {
  if (rows == 8 && cols == 8 && Ops::transpose_floats(src, ls, dst, ld)) return;
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) std::memcpy(dst + c * ld + r, src + r * ls + c, 4);
}

// Element (n, k) of a panel-packed [Np][Kp] matrix.
template <class T>
inline size_t packed_index(int n, int k, int Kp) {
  constexpr int P = Elem<T>::P;
  return (static_cast<size_t>(n / kPanel) * (Kp / P) + k / P) * kPanel * P + (n % kPanel) * P + k % P;
}

// For bf16 the panel rows are 32-bit words, one (k, k + 1) pair of one n each: with rows of the source contiguous
// along k, 8 rows x 8 pairs are an 8 x 8 transpose of words.
template <class S, class T>
inline void pack_pairs_from_rows(const S* src, ptrdiff_t sn, int N, int K, int Kp, T* dst) {
  const int kpairs = (K + 1) / 2;
  for (int n0 = 0; n0 < N; n0 += 8) {
    const int nn = imin(8, N - n0);
    float* words = reinterpret_cast<float*>(dst + packed_index<T>(n0, 0, Kp));  // as floats for transpose_tile
    for (int kp0 = 0; kp0 < kpairs; kp0 += 8) {
      const int np = imin(8, kpairs - kp0);
      const int nk = imin(16, K - 2 * kp0);
      float tile[8][8];
      for (int i = 0; i < nn; ++i) {
        const S* row = src + (n0 + i) * sn + 2 * kp0;
        T values[16] = {};  // little-endian: value 2c is the low half of word c
        if (nk == 16) {
          for (int c = 0; c < 16; ++c) values[c] = Elem<T>::from(Elem<S>::to(row[c]));  // a vector conversion
        } else {
          for (int c = 0; c < nk; ++c) values[c] = Elem<T>::from(Elem<S>::to(row[c]));
        }
        std::memcpy(tile[i], values, sizeof values);
      }
      transpose_tile(tile[0], 8, nn, np, words + kp0 * kPanel, kPanel);
    }
  }
}

// The other bf16 case: each word interleaves two source rows k, k + 1, walked along n (contiguous when sn == 1).
template <class S, class T>
inline void pack_pairs_from_columns(const S* src, ptrdiff_t sn, ptrdiff_t sk, int N, int K, int Kp, T* dst) {
  for (int n0 = 0; n0 < N; n0 += kPanel) {
    const int nn = imin(kPanel, N - n0);
    for (int k = 0; k < K; k += 2) {
      const S* even = src + k * sk + n0 * sn;
      T* out = dst + packed_index<T>(n0, k, Kp);
      if (k + 1 < K) {
        const S* odd = even + sk;
        for (int i = 0; i < nn; ++i) {
          out[2 * i] = Elem<T>::from(Elem<S>::to(even[i * sn]));
          out[2 * i + 1] = Elem<T>::from(Elem<S>::to(odd[i * sn]));
        }
      } else {  // the odd values are padding, zeroed already
        for (int i = 0; i < nn; ++i) out[2 * i] = Elem<T>::from(Elem<S>::to(even[i * sn]));
      }
    }
  }
}

// Loops walk the source along its contiguous dimension: walking 16 rows at once, as the panel order would,
// touches rows a power of two apart, which share one cache set (bf16 walks 8, within an L1 set's 8 or more ways).
template <class S, class T>
inline void pack_from(const S* src, ptrdiff_t sn, ptrdiff_t sk, int N, int K, T* dst) {
  constexpr int P = Elem<T>::P;
  const int Kp = static_cast<int>(round_up(K, kPad));
  std::memset(dst, 0, sizeof(T) * packed_size(N, K));  // the padding
  if constexpr (P == 2) {
    if (sk == 1) return pack_pairs_from_rows(src, sn, N, K, Kp, dst);
    return pack_pairs_from_columns(src, sn, sk, N, K, Kp, dst);
  } else if (sk == 1) {
    for (int n = 0; n < N; ++n) {
      const S* row = src + n * sn;
      T* out = dst + packed_index<T>(n, 0, Kp);
      for (int k = 0; k < K; ++k) out[k * kPanel] = Elem<T>::from(Elem<S>::to(row[k]));
    }
  } else {  // each panel row takes 16 consecutive n of one k, contiguous when sn == 1
    for (int n0 = 0; n0 < N; n0 += kPanel) {
      const int nn = imin(kPanel, N - n0);
      for (int k = 0; k < K; ++k) {
        const S* col = src + k * sk + n0 * sn;
        T* out = dst + packed_index<T>(n0, k, Kp);
        for (int i = 0; i < nn; ++i) out[i] = Elem<T>::from(Elem<S>::to(col[i * sn]));
      }
    }
  }
}

template <class T>
inline void pack(const void* src, DType st, ptrdiff_t sn, ptrdiff_t sk, int N, int K, T* dst) {
  if (st == DType::bf16)
    pack_from(static_cast<const bf16*>(src), sn, sk, N, K, dst);
  else
    pack_from(static_cast<const float*>(src), sn, sk, N, K, dst);
}

// The blocks columns x 16 rows that panel nb + 4 of W (of npanels, wstride elements apart) holds at base's
// columns, into the cache ahead of their use.
template <class T>
inline void prefetch_ahead(const T* base, int nb, int npanels, size_t wstride, int blocks) {
  constexpr int kAhead = 4;
  if (nb + kAhead >= npanels) return;
  const char* ahead = reinterpret_cast<const char*>(base + (nb + kAhead) * wstride);
  for (size_t off = 0; off < static_cast<size_t>(blocks) * kPanel * kPanel * sizeof(T); off += 64)
    __builtin_prefetch(ahead + off);
}

// 16 rows of W (one panel) x 16 of its columns (src), transposed into the 16 x 16 block of W^T's panel at out.
template <class T>
inline void transposed_block(const T* src, T* out) {
  constexpr int P = Elem<T>::P;
  if constexpr (P == 2) {
    const uint64_t* s = reinterpret_cast<const uint64_t*>(src);
    uint64_t* o = reinterpret_cast<uint64_t*>(out);
    if (Ops::transpose_words(s, o)) return;
    for (int q = 0; q < 8; ++q)
      for (int kp = 0; kp < 8; ++kp) {
        const uint64_t w = s[kp * 8 + q];
        o[q * 8 + kp] = (w & 0xffff00000000ffffull) | ((w >> 16) & 0x00000000ffff0000ull) |
                        ((w << 16) & 0x0000ffff00000000ull);
      }
  } else {
    for (int kk = 0; kk < kPanel; ++kk)
      for (int nn = 0; nn < kPanel; ++nn) out[nn * kPanel + kk] = src[kk * kPanel + nn];
  }
}

// The panels of W^T for W's columns k0 .. k0 + 16 nblocks, from W packed as [Np][Kp]: 16 output columns each
// (pstride elements apart), reduction over n. For bf16, the 4 values of W rows n, n+1 x columns k, k+1 are one
// 64-bit word in both layouts, with the middle two values swapped: each 16 rows of a panel are an 8 x 8 transpose
// of such words. The walk goes down W's panels, each time reading the 16 nblocks contiguous bytes of the columns
// and prefetching those a few panels ahead: the runs are short and far apart, too far for the hardware prefetcher.
template <class T>
inline void pack_transposed_panels(const T* W, int Np, int Kp, int k0, int nblocks, size_t pstride, T* dst) {
  const size_t wstride = static_cast<size_t>(Kp) * kPanel;  // elements from one panel of W to the next
  const T* base = W + static_cast<size_t>(k0) * kPanel;
  for (int nb = 0; nb < Np / kPanel; ++nb) {
    prefetch_ahead(base, nb, Np / kPanel, wstride, nblocks);
    for (int b = 0; b < nblocks; ++b)
      transposed_block(base + nb * wstride + b * kPanel * kPanel, dst + b * pstride + nb * kPanel * kPanel);
  }
}

// C[M][16 NV] = sum_s A_s[M][Np] * (W_s^T panels for W_s's columns k0 .. k0 + 16 NV), for few rows: each 16 x 16
// block of the transposed panels is made right before the multiply-adds that use it, so it never leaves L1 and
