// One MoE layer's routed experts: frozen weights packed for the chosen backend, forward and backward submitted
// to a thread pool and awaited separately, so the caller (the GPU side) keeps working meanwhile.
#pragma once

#include <atomic>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "plan.h"
#include "shared_weights.h"
#include "thread_pool.h"

namespace kt {

// Backends compiled into this build and the one to use ("auto": the best this CPU runs).
std::vector<std::string> supported_isas();
const Backend* select_backend(const std::string& isa);

// 64-byte aligned, uninitialised, grow-only memory. From 2 MB on, aligned to and advised as huge pages: the
// weights and the activations are streamed, and 4 KB pages cost a TLB miss every 64 lines.
class Buffer {
 public:
  void* reserve(size_t bytes);
  // Memory owned elsewhere (a shared-memory segment), not freed here.
  void adopt(void* p, size_t bytes) {
    data_ = std::unique_ptr<void, Free>(p, Free{false});
    size_ = bytes;
  }
  void* data() const { return data_.get(); }
  size_t size() const { return size_; }

 private:
  struct Free {
    bool owned;
    void operator()(void* p) const {
      if (owned) std::free(p);
    }
  };
  std::unique_ptr<void, Free> data_{nullptr, Free{true}};
  size_t size_ = 0;
};

// What a forward keeps for its backward: the gathered input, the activation, its derivatives and the LoRA A products.
struct SavedActivations {
  Buffer X, Z, dz_dg, dz_du, ag, ad;
  size_t bytes() const { return X.size() + Z.size() + dz_dg.size() + dz_du.size() + ag.size() + ad.size(); }
};

// The saved activations of freed contexts, for the next forwards to reuse: fresh memory costs a page fault and a
// zeroing per 4 KiB, tens of thousands per layer at qlen 2048, about as long as the gather phase. It holds at most
// as many sets as were alive at once (the peak of a training step), until release().
class ActivationCache {
 public:
  std::unique_ptr<SavedActivations> take();
  void give(std::unique_ptr<SavedActivations> saved);
  void release();
  size_t bytes() const;

 private:
  mutable std::mutex mu_;
  std::vector<std::unique_ptr<SavedActivations>> free_;
};

// A thread pool and the scratch memory of the jobs it runs; jobs run one at a time, so they share it. Layers with
// the same thread count share one executor.
struct Executor {
  explicit Executor(int threads) : pool(threads) {}
  ThreadPool pool;
  std::shared_ptr<ActivationCache> cache = std::make_shared<ActivationCache>();
  SavedActivations activations;  // of the forwards that keep none
  Buffer rows_out, lora_pk, ag_s, ad_s, dY, dw_parts, dG, dU, bdy, bdy_s, gbg, gbg_s, scratch, gu_Bt, dn_Bt,
      gu_Gt, dn_Gt;
  // Which forward's LoRA B factors gu_Bt and dn_Bt hold (ids count the forwards run here): a backward right after
  // its forward (the bench, or a checkpointed layer's recompute) finds them there and skips its layout phase.
  uint64_t lora_layout_of = 0, forwards_run = 0;
};
std::shared_ptr<Executor> shared_executor(int threads);
// Over the executors alive: the bytes their activation caches hold, and handing those back to the system.
size_t cached_activation_bytes();
void release_cached_activations();

class MoELayer;

// What a forward keeps for its backward. Python holds it; freeing it frees the activations.
struct ForwardContext {
  ForwardContext();
  ~ForwardContext();
  ForwardContext(const ForwardContext&) = delete;
  ForwardContext& operator=(const ForwardContext&) = delete;
  static int64_t live();  // contexts alive in the process

  int T = 0, k = 0;
  DType io = DType::f32;
  PassLora lora;
  std::vector<int64_t> offsets;
  std::vector<int32_t> row_src, active;
  std::vector<uint8_t> slot_present;  // [T*k] when some slot was skipped (id -1), else empty
  std::vector<float> row_weight;
  Routing routing() const;  // the above as the core reads it
  std::unique_ptr<SavedActivations> saved;  // with save_for_backward; returns to `cache` with the context
  uint64_t forward_id = 0;                  // see Executor::lora_layout_of
  std::shared_ptr<ActivationCache> cache;
  // The layer whose forward made it (a backward of another layer would read its routing and activations as its
  // own), and whether that forward was cancelled or failed, which leaves the activations unfinished.
  std::weak_ptr<const MoELayer> layer;
  std::string layer_name;
  std::atomic<bool> unusable{false};
};

// The activation variant and the frozen biases (fp32, transformers' order: gate_up [E][2I] gate then up, down
// [E][H]), both optional.
struct ExpertActivation {
  Activation act = Activation::swiglu;
  float alpha = 0.f, limit = 0.f;
  const float* gate_up_bias = nullptr;
  const float* down_bias = nullptr;
  bool gate_up_lora_interleaved = false;
};

struct LoraArgs {
  LoraRef gu, dn;
};

struct LoraGradArgs {
  LoraGrad gu, dn;
  bool accumulate = true;  // add into the buffers; else overwrite them whole (no zeroing needed beforehand)
};

// Owned through a shared_ptr (its jobs hold one, so the layer, its weights and its executor outlive any job
// running on them, whoever lets go of the layer first).
class MoELayer : public std::enable_shared_from_this<MoELayer> {
 public:
  static constexpr int kMaxThreads = 4096;
  MoELayer(std::string name, int experts, int hidden, int intermediate, const void* gate_up, const void* down,
           DType weight_dtype, const std::string& isa, int threads, const ExpertActivation& activation = {},
           bool backward_copy = false, const SharedSpec& shared = {});

  // A started job and, for a forward with save, the context its backward needs (valid once the job is done). The
  // job reads and writes the caller's buffers until it is done: the caller keeps them alive until then.
  struct Submitted {
    std::shared_ptr<Job> job;
    std::shared_ptr<ForwardContext> context;
  };
  // x [T][H], ids [T][k] int64, weights [T][k] fp32, y [T][H] (x's dtype): starts the forward and returns at once.
  Submitted submit_forward(int T, int k, const void* x, DType io, const int64_t* ids, const float* weights, void* y,
                           bool save, const LoraArgs& lora);
  // dy, dx [T][H] (the forward's dtype), dw [T][k] fp32; LoRA grads are added into the given fp32 buffers, or
  // written over them. The context must come from a finished, uncancelled forward of this layer.
  Submitted submit_backward(std::shared_ptr<ForwardContext> ctx, const void* dy, void* dx, float* dw,
                            const LoraGradArgs& grads);

  const std::string& name() const { return name_; }
  const char* isa() const { return backend_->name; }
  int threads() const { return exec_->pool.threads(); }
  int experts() const { return E_; }
  int hidden() const { return H_; }
  int intermediate() const { return I_; }
  DType compute() const { return compute_; }
  size_t weight_bytes() const;  // both copies when the backward has its own
  // The shared-memory segment holding the packed weights ("" when they are this process's own) and whether this
  // process only maps it (read-only).
  std::string shared_name() const { return shared_ ? shared_->name() : std::string(); }
  bool weights_read_only() const { return shared_ && !shared_->creator(); }
  static size_t dtype_size(DType d) { return d == DType::bf16 ? 2 : 4; }

  // Reads the frozen weights back in the transformers layout (for saving a base checkpoint).
  void export_weights(void* gate_up, void* down) const;

  // The forward's packed weights where they lie, for a reader that copies them elsewhere as they are (the streamed
  // accelerator tier, which registers this memory as pinned: no second host copy): per expert, gate and up as W[I][H]
  // and down as W[H][I] in the panel layout of plan.h (N and K padded to Np, Kp), experts gate_up_stride /
  // down_stride elements apart.
  struct PackedWeights {
    const void* gate;
    const void* up;
    const void* down;
    size_t gate_up_stride, down_stride;  // elements per expert
  };
  PackedWeights packed_weights() const { return {wg_.data(), wu_.data(), wd_.data(), gu_stride_, d_stride_}; }
  int padded_hidden() const { return Hp_; }
  int padded_intermediate() const { return Ip_; }

 private:
  friend class LayerJob;
  friend class ForwardJob;
  friend class BackwardJob;
  [[noreturn]] void fail(const std::string& what) const { throw std::invalid_argument(name_ + ": " + what); }
  void check_lora(const LoraRef& l, const char* which) const;
  LayerConstants make_constants() const;

  std::string name_;
  int E_, H_, I_, Hp_, Ip_;
  DType compute_;
  const Backend* backend_;
  std::shared_ptr<Executor> exec_;
  Buffer wg_, wu_, wd_;
  Buffer wg_t_, wu_t_, wd_t_;  // with backward_copy: packed for the backward, so it transposes nothing
  std::unique_ptr<SharedSegment> shared_;  // where the buffers above live when they are shared by local ranks
  ExpertActivation activation_;
  Buffer gu_bias_, d_bias_;  // padded copies of the biases
  size_t gu_stride_ = 0, d_stride_ = 0;
  LayerConstants constants_;  // the above as the core reads them
};

}  // namespace kt
