// Plain data shared by the ISA-neutral orchestration (moe_layer.cpp) and the ISA backends: element types, the
// "plan" of one forward or backward pass as raw pointers, and the Backend table through which the orchestration
// calls a backend's core (its passes as phase tables, its packing, its memory sizes). Backend translation units
// include this, so everything here is either a POD or has internal linkage: a function compiled with AVX-512 flags
// must never be picked by the linker for a caller on a CPU without it.
#pragma once

#include <algorithm>  // also for the numeric core, which backends include inside an anonymous namespace
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace kt {

using bf16 = uint16_t;

enum class DType : int { bf16 = 0, f32 = 1 };

// The expert's gated activation z(g, u) of the gate and up projections:
//   swiglu   z = silu(g) * u
//   gpt_oss  z = (clamp(u, -limit, limit) + 1) * gc * sigmoid(alpha * gc),  gc = min(g, limit)   (GPT-OSS)
enum class Activation : int { swiglu = 0, gpt_oss = 1 };

static inline float bf16_to_f32(bf16 v) {
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even; NaN stays NaN (quieted). Branch-free so that loops over it vectorise.
static inline bf16 f32_to_bf16(float f) {
  uint32_t u;  // memcpy, not bit_cast: GCC 12 vectorises loops over the former only
  std::memcpy(&u, &f, 4);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (u >> 16) | 0x40u;
  return static_cast<bf16>((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

static inline size_t round_up(size_t v, size_t m) { return (v + m - 1) / m * m; }

// Packed matrices: a logical W[N][K] (output n, reduction k) is stored as 16-column panels, each panel K/P rows of
// 16 columns x P consecutive k ("VNNI" for bf16, P = 2; plain for fp32, P = 1): element (n, k) lives at
//   ((n / 16) * (Kp / P) + k / P) * 16 * P + (n % 16) * P + k % P
// with N padded to Np and K to Kp (multiples of kPad) with zeros. A GEMM reads one panel as 16 output columns;
// 16 of its rows (32 values of k) are one AMX B tile as they lie.
constexpr int kPanel = 16;
constexpr int kPad = 32;  // N and K are padded to this: whole 32-deep reduction steps (one AMX tile of K)

// The LoRA factors of one PEFT ParamWrapper on fused experts: A [E*r, in] (expert-major rows), B [out, E*r]
// (rank-major columns: col = j*E + e). They are read where they are, never copied.
struct LoraRef {
  const void* A = nullptr;
  const void* B = nullptr;
  DType dtype = DType::f32;
  int rank = 0;
  float scaling = 0.f;
};

// Gradient buffers (fp32, PEFT layout) that a backward adds into.
struct LoraGrad {
  float* A = nullptr;
  float* B = nullptr;
};

// One pass of one layer, in four parts that the orchestration fills at different times: the layer's constants once
// per layer, the routing and the LoRA factors once per forward (its backward reuses them), the buffers per job. The
// core reads them all through Plan.

// The frozen layer: sizes, packed weights, activation and biases.
struct LayerConstants {
  int E = 0, H = 0, I = 0, Hp = 0, Ip = 0;  // Hp, Ip: H and I padded to multiples of kPad
  int ldh = 0, ldi = 0;  // row strides of the activation rows: Hp, Ip plus 64 bytes, so rows never sit 4 KiB apart
                         // (which maps the MR rows a GEMM reads together onto one cache set)
  const void* wg = nullptr;  // packed per expert: gate [I][H], up [I][H], down [H][I]
  const void* wu = nullptr;
  const void* wd = nullptr;
  size_t w_gu_stride = 0, w_d_stride = 0;  // elements per expert
  // Optional second copy packed for the backward's products (null: transposed from the above as they run):
  // gate^T, up^T [H][I] and down^T [I][H], the same element counts per expert.
  const void* wg_t = nullptr;
  const void* wu_t = nullptr;
  const void* wd_t = nullptr;
  Activation act = Activation::swiglu;
  float alpha = 0.f, limit = 0.f;          // gpt_oss activation constants
  const float* gu_bias = nullptr;          // optional [E][2 * Ip]: gate bias, then up bias
  const float* d_bias = nullptr;           // optional [E][Hp]
  bool gu_interleaved = false;  // gate_up LoRA B rows alternate gate, up (GPT-OSS) instead of gate block, up block
  int col_block = 64;                      // columns per (expert, column block) item
  int column_blocks(int cols) const { return (cols + col_block - 1) / col_block; }
};

// The routing of one forward and its backward. Rows are (token, slot) pairs grouped by expert: rows offsets[e] ..
// offsets[e+1] belong to expert e, and row r came from slot row_src[r] = t * k + j. A slot with expert id -1 (computed
// by another executor tier) has no row: R = offsets[E] <= T * k.
struct Routing {
  int T = 0, k = 0;
  const int64_t* offsets = nullptr;  // [E + 1]
  const int32_t* row_src = nullptr;  // [R]
  const float* row_weight = nullptr; // [R]
  const uint8_t* slot_present = nullptr;  // [T*k] 0 for a skipped slot (no row, left out of the sum); null: all
  const int32_t* active = nullptr;   // the experts with rows, ascending: what the per-expert work items walk
  int active_count = 0;
};

// The LoRA factors of one forward and its backward (rank 0: none), read in place.
struct PassLora {
  LoraRef gu, dn;
  int r1p = 0, r2p = 0;  // ranks padded to kPad
};

// The memory one job reads and writes: the caller's tensors and the executor's buffers.
struct Buffers {
  DType io = DType::f32;  // dtype of x, y, dy, dx
  const void* x = nullptr;
  void* y = nullptr;
  const void* dy = nullptr;
  void* dx = nullptr;
  float* dw = nullptr;
  LoraGrad gu_grad, dn_grad;
  bool grad_accumulate = true;  // add into gu_grad / dn_grad; else write them whole

  // Activations, expert-major rows, compute type; X: [R][ldh], Z and its derivatives by gate and up: [R][ldi].
  void* X = nullptr;
  void* Z = nullptr;
  void* dz_dg = nullptr;
  void* dz_du = nullptr;
  bool save = false;  // forward keeps dz_dg and dz_du for the backward

  // ag = X A_gu^T, ad = Z A_d^T, unscaled fp32 [R][r]; their scaled copies in compute type.
  float* ag = nullptr;
  float* ad = nullptr;
  void* ag_s = nullptr;  // [R][r1p]
  void* ad_s = nullptr;  // [R][r2p]
  float* gu_Bt = nullptr;  // the B factors expert-major: [E][r][out] fp32
  float* dn_Bt = nullptr;
  bool lora_layout_ready = false;  // gu_Bt and dn_Bt already hold this forward's factors (the backward skips them)
  float* gu_Gt = nullptr;  // their gradients, same layout, for the experts that had rows (backward)
  float* dn_Gt = nullptr;
  void* lora_pk = nullptr;  // per-expert packed LoRA operands for the column-block phases
  size_t lora_pk_stride = 0;

  // Backward working buffers.
  void* dY = nullptr;     // [R][ldh] compute type, unweighted dy rows
  float* dw_parts = nullptr;  // [R][Ip / col_block] each I block's share of <dL/dz before the weight, z>
  void* dG = nullptr;     // [R][ldi]
  void* dU = nullptr;
  // LoRA intermediates, unscaled fp32 and their scaled copies in compute type: bdy = dY Bd [R][r2p],
  // gbg = dG Bg + dU Bu [R][r1p]. Apart, because the LoRA gradient phase writes gbg while other experts still read
  // their bdy.
  float* bdy = nullptr;
  void* bdy_s = nullptr;
  float* gbg = nullptr;
  void* gbg_s = nullptr;

  // [T*k][Hp] per-slot outputs before the sum over slots, in compute type: the sum is fp32, but the slots are
  // rounded as in a bf16 GEMM's output, which halves the largest stream of the down and dX phases.
  void* rows_out = nullptr;

  char* scratch = nullptr;  // per worker
  size_t scratch_bytes = 0;
};

struct Plan : LayerConstants, Routing, PassLora, Buffers {};

// One phase of a pass as the core defines it: its name in the profile, its work items for a plan (the workers
// share them; the count may depend on the earlier phases' results), and one item.
struct Phase {
  const char* name;
  size_t (*items)(const Plan& plan);
  void (*run)(const Plan& plan, size_t item, int worker);
};
struct Pass {
  const Phase* phases;
  int count;
};

// What a backend provides: the same numeric core instantiated with its vector operations.
struct Backend {
  const char* name;
  // Pack a logical W[N][K] read as src[n * sn + k * sk] into the packed layout.
  void (*pack)(DType compute, const void* src, DType src_dtype, ptrdiff_t sn, ptrdiff_t sk, int N, int K, void* dst);
  // The phases of a forward and of a backward, by compute type ([static_cast<int>(DType)]).
  Pass forward[2], backward[2];
  // The memory the phases carve for a plan's layer constants and LoRA ranks: scratch bytes per worker, and
  // elements of the packed LoRA operands per expert.
  size_t (*scratch_bytes)(DType compute, const Plan& plan);
  size_t (*lora_operand_elems)(const Plan& plan);
};

// Defines kt::backend_<isa>() for a backend file, after its anonymous namespace that included kernel_impl.h.
#define KT_DEFINE_BACKEND(isa)                   \
  namespace kt {                                 \
  const Backend* backend_##isa() {               \
    static const Backend backend = core(#isa);   \
    return &backend;                             \
  }                                              \
  }

}  // namespace kt
