// The numeric core, written once; each backend file includes this inside an anonymous namespace after defining
// `struct Ops`, its vector operations (see backends/scalar.cpp for the contract), and so compiles it for its own ISA.
// The compute type T is bf16 (P = 2 values per 32-bit pair, fp32 accumulation) or float (P = 1). The core is split
// by job under core/: packing, GEMM, the LoRA B layout, what the passes' work items share, the forward, the
// backward; this file adds the element types they use and the Backend the orchestration (moe_layer.cpp) calls.
//
// Forward of expert e on its rows X (gathered tokens), with LoRA on the fused gate_up and on down:
//   G = X Wg^T + s1 (X Agu^T) Bg^T      U = X Wu^T + s1 (X Agu^T) Bu^T      Z = silu(G) * U
//   D = Z Wd^T + s2 (Z Ad^T) Bd^T       y[t] = sum_j w[t,j] D[row(t,j)]
// Backward, with dY the rows of dy:  dZ' = dY Wd + s2 (dY Bd) Ad,  dw = <dZ', Z>,  dZ = w dZ',
//   dG = dZ dz/dg,  dU = dZ dz/du  (the derivatives saved by the forward),
//   dX = dG Wg + dU Wu + s1 (dG Bg + dU Bu) Agu,  plus the LoRA factor grads.

// --------------------------------------------------------------------------------------------- element types
template <class T> struct Elem;
template <> struct Elem<bf16> {
  static constexpr int P = 2;
  static inline bf16 from(float v) { return f32_to_bf16(v); }
  static inline float to(bf16 v) { return bf16_to_f32(v); }
};
template <> struct Elem<float> {
  static constexpr int P = 1;
  static inline float from(float v) { return v; }
  static inline float to(float v) { return v; }
};

inline int imin(int a, int b) { return a < b ? a : b; }

inline float load_io(const void* p, DType dt, size_t i) {
  return dt == DType::bf16 ? bf16_to_f32(static_cast<const bf16*>(p)[i]) : static_cast<const float*>(p)[i];
}

#include "core/packing.h"
#include "core/gemm.h"
#include "core/lora_layout.h"
#include "core/pass_common.h"
#include "core/forward.h"
#include "core/backward.h"

// --------------------------------------------------------------------------------------------- the Backend
inline void backend_pack(DType compute, const void* src, DType st, ptrdiff_t sn, ptrdiff_t sk, int N, int K,
                         void* dst) {
  if (compute == DType::bf16)
    pack(src, st, sn, sk, N, K, static_cast<bf16*>(dst));
  else
    pack(src, st, sn, sk, N, K, static_cast<float*>(dst));
}

inline size_t backend_scratch_bytes(DType compute, const Plan& p) {
  return compute == DType::bf16 ? scratch_bytes<bf16>(p) : scratch_bytes<float>(p);
}

template <size_t N>
constexpr Pass pass_of(const Phase (&phases)[N]) {
  return {phases, static_cast<int>(N)};
}

// The table KT_DEFINE_BACKEND (plan.h) exports; passes indexed by DType (bf16 = 0, f32 = 1).
inline Backend core(const char* name) {
  static_assert(static_cast<int>(DType::bf16) == 0 && static_cast<int>(DType::f32) == 1, "pass order");
  return {name,
          backend_pack,
          {pass_of(kForwardPhases<bf16>), pass_of(kForwardPhases<float>)},
          {pass_of(kBackwardPhases<bf16>), pass_of(kBackwardPhases<float>)},
          backend_scratch_bytes,
          lora_operand_elems};
}
