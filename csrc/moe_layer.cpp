#include "moe_layer.h"

#include <algorithm>
#include <map>
#include <mutex>

#include <pthread.h>
#include <sys/mman.h>

#if defined(__x86_64__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace kt {

const Backend* backend_scalar();
#if defined(__x86_64__)
const Backend* backend_avx2();
const Backend* backend_avx512_bf16();
const Backend* backend_amx_bf16();
#endif

namespace {

struct IsaEntry {
  const char* name;
  const Backend* (*get)();
  bool (*cpu_runs)();
};

#if defined(__x86_64__)
bool cpu_avx512_bf16() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

// AMX needs the CPU feature bits and, on Linux, the process's permission to use the tile state.
bool cpu_amx_bf16() {
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!cpu_avx512_bf16() || !__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tile = d & (1u << 24), bf16 = d & (1u << 22);
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return tile && bf16 && syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}
#endif

// Best first.
const IsaEntry kIsas[] = {
#if defined(__x86_64__)
    {"amx_bf16", backend_amx_bf16, cpu_amx_bf16},
    {"avx512_bf16", backend_avx512_bf16, cpu_avx512_bf16},
    {"avx2", backend_avx2, [] { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }},
#endif
    {"scalar", backend_scalar, [] { return true; }},
};

using kt::MoELayer;
size_t dtype_size(DType d) { return MoELayer::dtype_size(d); }

std::atomic<int64_t> g_live_contexts{0};

// What a shared segment's packed weights depend on: shapes, dtype, copies and the packing (plan.h's panel layout).
uint64_t shared_weights_fingerprint(int E, int H, int I, DType dtype, int copies) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a over the fields
  for (uint64_t v : {uint64_t(E), uint64_t(H), uint64_t(I), uint64_t(dtype == DType::bf16), uint64_t(copies),
                     uint64_t(kPanel), uint64_t(kPad)})
    for (int b = 0; b < 8; ++b) h = (h ^ ((v >> (8 * b)) & 0xff)) * 1099511628211ull;
  return h;
}

}  // namespace

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  for (const auto& e : kIsas)
    if (e.cpu_runs()) names.emplace_back(e.name);
  return names;
}

const Backend* select_backend(const std::string& isa) {
  for (const auto& e : kIsas) {
    if (isa != "auto" && isa != e.name) continue;
    if (e.cpu_runs()) return e.get();
    if (isa != "auto") break;
  }
  std::string msg = "ISA '" + isa + "' is not available on this CPU; available: auto";
  for (const auto& n : supported_isas()) msg += ", " + n;
  throw std::invalid_argument(msg);
}

static std::mutex g_executors_mu;
static std::map<int, std::weak_ptr<Executor>> g_executors;

template <class F>
static void for_each_executor(F&& f) {
  std::lock_guard<std::mutex> lock(g_executors_mu);
  for (auto& [threads, slot] : g_executors)
    if (auto exec = slot.lock()) f(*exec);
}

// The registry's mutex is held across fork(), so that a child (which makes executors of its own: the parent's threads
// are not there) never inherits it locked. A pool may be made or dropped under it, so it is taken before the pools'
// (thread_pool.cpp): fork() runs the prepare handlers last registered first, and this one registers after the first
// pool has.
static void hold_executors_across_fork() {
  static std::once_flag once;
  std::call_once(once, [] {
    pthread_atfork([] { g_executors_mu.lock(); }, [] { g_executors_mu.unlock(); }, [] { g_executors_mu.unlock(); });
  });
}

std::shared_ptr<Executor> shared_executor(int threads) {
  std::lock_guard<std::mutex> lock(g_executors_mu);
  auto& slot = g_executors[threads];
  auto exec = slot.lock();
  if (!exec || !exec->pool.alive()) {  // a fork child's layers get a pool of their own
    exec = std::make_shared<Executor>(threads);
    slot = exec;
  }
  hold_executors_across_fork();
  return exec;
}

void* Buffer::reserve(size_t bytes) {
  if (bytes > size_) {
    constexpr size_t kHugePage = size_t(2) << 20;
    const bool huge = bytes >= kHugePage;
    const size_t size = round_up(bytes, huge ? kHugePage : 4096);
    void* p = std::aligned_alloc(huge ? kHugePage : 64, size);
    if (!p) throw std::bad_alloc();
#if defined(MADV_HUGEPAGE)
    if (huge) madvise(p, size, MADV_HUGEPAGE);  // advice only: without transparent huge pages nothing changes
#endif
    data_ = std::unique_ptr<void, Free>(p, Free{true});
    size_ = size;
  }
  return data_.get();
}

size_t cached_activation_bytes() {
  size_t bytes = 0;
  for_each_executor([&](Executor& ex) { bytes += ex.cache->bytes(); });
  return bytes;
}

void release_cached_activations() {
  for_each_executor([](Executor& ex) { ex.cache->release(); });
}

std::unique_ptr<SavedActivations> ActivationCache::take() {
  std::lock_guard<std::mutex> lock(mu_);
  if (free_.empty()) return std::make_unique<SavedActivations>();
  auto saved = std::move(free_.back());  // the last freed: the likeliest to be the right size and still cached
  free_.pop_back();
  return saved;
}

void ActivationCache::give(std::unique_ptr<SavedActivations> saved) {
  std::lock_guard<std::mutex> lock(mu_);
  free_.push_back(std::move(saved));
}

void ActivationCache::release() {
  std::vector<std::unique_ptr<SavedActivations>> freed;  // freed after the lock is let go
  {
    std::lock_guard<std::mutex> lock(mu_);
    freed.swap(free_);
  }
}

size_t ActivationCache::bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  size_t bytes = 0;
  for (const auto& s : free_) bytes += s->bytes();
  return bytes;
}

ForwardContext::ForwardContext() { g_live_contexts.fetch_add(1); }
ForwardContext::~ForwardContext() {
  if (saved && cache) cache->give(std::move(saved));
  g_live_contexts.fetch_sub(1);
}
int64_t ForwardContext::live() { return g_live_contexts.load(); }

// ------------------------------------------------------------------------------------------------- the layer
MoELayer::MoELayer(std::string name, int experts, int hidden, int intermediate, const void* gate_up, const void* down,
                   DType weight_dtype, const std::string& isa, int threads, const ExpertActivation& activation,
                   bool backward_copy, const SharedSpec& shared)
    : name_(std::move(name)), E_(experts), H_(hidden), I_(intermediate), compute_(weight_dtype),
      activation_(activation) {
  if (E_ < 1 || H_ < 1 || I_ < 1) fail("experts, hidden and intermediate sizes must be positive");
  if (!gate_up || !down) fail("expert weights are missing");
  if (threads < 1 || threads > kMaxThreads)
    fail("threads must be in [1, " + std::to_string(kMaxThreads) + "], got " + std::to_string(threads));
  backend_ = select_backend(isa);
  exec_ = shared_executor(threads);
  Hp_ = static_cast<int>(round_up(H_, kPad));
  Ip_ = static_cast<int>(round_up(I_, kPad));
  gu_stride_ = static_cast<size_t>(Ip_) * Hp_;
  d_stride_ = static_cast<size_t>(Hp_) * Ip_;
  const size_t es = dtype_size(compute_);
  Buffer* weights[] = {&wg_, &wu_, &wd_, &wg_t_, &wu_t_, &wd_t_};
  const size_t weight_sizes[] = {E_ * gu_stride_ * es, E_ * gu_stride_ * es, E_ * d_stride_ * es};
  const int copies = backward_copy ? 2 : 1;
  if (shared.name.empty()) {
    for (int i = 0; i < 3 * copies; ++i) weights[i]->reserve(weight_sizes[i % 3]);
  } else {  // one segment for all local ranks: each matrix on its own huge-page boundary
    size_t offsets[6], total = 0;
    for (int i = 0; i < 3 * copies; ++i) {
      offsets[i] = total;
      total += round_up(weight_sizes[i % 3], size_t(2) << 20);
    }
    const uint64_t fingerprint = shared_weights_fingerprint(E_, H_, I_, compute_, copies);
    shared_ = shared.create ? SharedSegment::create(shared, total, fingerprint, name_)
                            : SharedSegment::open(shared, total, fingerprint, name_);
    for (int i = 0; i < 3 * copies; ++i) weights[i]->adopt(shared_->data() + offsets[i], weight_sizes[i % 3]);
  }
  if (activation.gate_up_bias) {
    float* b = static_cast<float*>(gu_bias_.reserve(sizeof(float) * E_ * 2 * Ip_));
    std::fill(b, b + static_cast<size_t>(E_) * 2 * Ip_, 0.f);
    for (int e = 0; e < E_; ++e)
      for (int half = 0; half < 2; ++half)
        std::copy_n(activation.gate_up_bias + (static_cast<size_t>(e) * 2 + half) * I_, I_,
                    b + (static_cast<size_t>(e) * 2 + half) * Ip_);
    activation_.gate_up_bias = b;
  }
  if (activation.down_bias) {
    float* b = static_cast<float*>(d_bias_.reserve(sizeof(float) * E_ * Hp_));
    std::fill(b, b + static_cast<size_t>(E_) * Hp_, 0.f);
    for (int e = 0; e < E_; ++e)
      std::copy_n(activation.down_bias + static_cast<size_t>(e) * H_, H_, b + static_cast<size_t>(e) * Hp_);
    activation_.down_bias = b;
  }

  // Pack all experts on the pool, one item per expert and packed matrix: gate [I][H], up [I][H] and down [H][I]
  // for the forward, and with the backward copy their transposes, packed from the same source with the strides
  // swapped.
  struct PackJob : Job {
    MoELayer* layer;
    const char* gate_up;
    const char* down;
    int matrices;
    int num_phases() const override { return 1; }
    size_t prepare(int) override { return static_cast<size_t>(matrices) * layer->E_; }
    void run(int, size_t item, int) override {
      MoELayer& L = *layer;
      const int e = static_cast<int>(item / matrices), which = static_cast<int>(item % matrices);
      const size_t es = dtype_size(L.compute_);
      const int H = L.H_, I = L.I_;
      const char* g = gate_up + static_cast<size_t>(e) * 2 * I * H * es;
      const char* u = g + static_cast<size_t>(I) * H * es;
      const char* d = down + static_cast<size_t>(e) * H * I * es;
      auto dst = [&](const Buffer& b, size_t stride) { return static_cast<char*>(b.data()) + e * stride * es; };
      switch (which) {
        case 0: return L.backend_->pack(L.compute_, g, L.compute_, H, 1, I, H, dst(L.wg_, L.gu_stride_));
        case 1: return L.backend_->pack(L.compute_, u, L.compute_, H, 1, I, H, dst(L.wu_, L.gu_stride_));
        case 2: return L.backend_->pack(L.compute_, d, L.compute_, I, 1, H, I, dst(L.wd_, L.d_stride_));
        case 3: return L.backend_->pack(L.compute_, g, L.compute_, 1, H, H, I, dst(L.wg_t_, L.gu_stride_));
        case 4: return L.backend_->pack(L.compute_, u, L.compute_, 1, H, H, I, dst(L.wu_t_, L.gu_stride_));
        default: return L.backend_->pack(L.compute_, d, L.compute_, 1, I, I, H, dst(L.wd_t_, L.d_stride_));
      }
    }
  };
  constants_ = make_constants();
  if (shared_ && !shared_->creator()) return;  // packed by local rank 0
  auto job = std::make_shared<PackJob>();
  job->layer = this;
  job->gate_up = static_cast<const char*>(gate_up);
  job->down = static_cast<const char*>(down);
  job->matrices = backward_copy ? 6 : 3;
  try {
    exec_->pool.submit(job);
    job->wait();
  } catch (const std::exception& e) {
    if (shared_) shared_->mark_failed(e.what());
    throw;
  }
  if (shared_) shared_->mark_ready();
}

size_t MoELayer::weight_bytes() const {
  return (wg_t_.data() ? 2 : 1) * E_ * (2 * gu_stride_ + d_stride_) * dtype_size(compute_);
}

void MoELayer::export_weights(void* gate_up, void* down) const {
  const size_t es = dtype_size(compute_);
  const int P = compute_ == DType::bf16 ? 2 : 1;
  // Element (n, k) of a packed [Np][Kp] matrix; see plan.h.
  auto unpack = [&](const char* packed, int N, int K, int Kp, char* out) {
    for (int n = 0; n < N; ++n)
      for (int k = 0; k < K; ++k) {
        const size_t idx =
            (static_cast<size_t>(n / kPanel) * (Kp / P) + k / P) * kPanel * P + (n % kPanel) * P + k % P;
        std::memcpy(out + (static_cast<size_t>(n) * K + k) * es, packed + idx * es, es);
      }
  };
  for (int e = 0; e < E_; ++e) {
    char* gu = static_cast<char*>(gate_up) + static_cast<size_t>(e) * 2 * I_ * H_ * es;
    unpack(static_cast<const char*>(wg_.data()) + e * gu_stride_ * es, I_, H_, Hp_, gu);
    unpack(static_cast<const char*>(wu_.data()) + e * gu_stride_ * es, I_, H_, Hp_,
           gu + static_cast<size_t>(I_) * H_ * es);
    unpack(static_cast<const char*>(wd_.data()) + e * d_stride_ * es, H_, I_, Ip_,
           static_cast<char*>(down) + static_cast<size_t>(e) * H_ * I_ * es);
  }
}

void MoELayer::check_lora(const LoraRef& l, const char* which) const {
  if (l.rank < 0) fail(std::string(which) + " LoRA rank must be >= 0");
  if (l.rank > 0 && (!l.A || !l.B)) fail(std::string(which) + " LoRA factors are missing");
}

LayerConstants MoELayer::make_constants() const {
  LayerConstants c;
  c.E = E_;
  c.H = H_;
  c.I = I_;
  c.Hp = Hp_;
  c.Ip = Ip_;
  const int row_pad = 64 / static_cast<int>(dtype_size(compute_));
  c.ldh = Hp_ + row_pad;
  c.ldi = Ip_ + row_pad;
  c.wg = wg_.data();
  c.wu = wu_.data();
  c.wd = wd_.data();
  c.w_gu_stride = gu_stride_;
  c.w_d_stride = d_stride_;
  c.wg_t = wg_t_.data();
  c.wu_t = wu_t_.data();
  c.wd_t = wd_t_.data();
  c.act = activation_.act;
  c.alpha = activation_.alpha;
  c.limit = activation_.limit;
  c.gu_bias = activation_.gate_up_bias;
  c.d_bias = activation_.down_bias;
  c.gu_interleaved = activation_.gate_up_lora_interleaved;
  return c;
}

Routing ForwardContext::routing() const {
  Routing r;
  r.T = T;
  r.k = k;
  r.offsets = offsets.data();
  r.row_src = row_src.data();
  r.row_weight = row_weight.data();
  r.slot_present = slot_present.empty() ? nullptr : slot_present.data();
  r.active = active.data();
  r.active_count = static_cast<int>(active.size());
  return r;
}

// A forward or a backward: the core's phase table for the layer's compute type, run over a plan of the layer's
// constants, the context's routing and LoRA factors, and buffers that the first phase's prepare reserves.
class LayerJob : public Job {
 public:
  LayerJob(std::shared_ptr<const MoELayer> layer, std::shared_ptr<ForwardContext> ctx, const Pass& pass)
      : layer_(std::move(layer)), ex_(*layer_->exec_), ctx_(std::move(ctx)), pass_(pass) {
    static_cast<LayerConstants&>(plan_) = layer_->constants_;
    static_cast<Routing&>(plan_) = ctx_->routing();
    static_cast<PassLora&>(plan_) = ctx_->lora;
    plan_.io = ctx_->io;
  }
  int num_phases() const override { return pass_.count; }
  size_t prepare(int phase) override {
    if (phase == 0) reserve();
    return pass_.phases[phase].items(plan_);
  }
  void run(int phase, size_t item, int worker) override { pass_.phases[phase].run(plan_, item, worker); }
  const char* phase_name(int phase) const override { return pass_.phases[phase].name; }
  void finish(bool completed) override {
    if (!completed) ex_.lora_layout_of = 0;  // the layout phase may have stopped half way
    ctx_.reset();
  }

 protected:
  // The job's buffers, on the first worker before the first phase (a throw fails the job).
  virtual void reserve() = 0;

  size_t rows() const { return static_cast<size_t>(ctx_->offsets.back()); }  // (token, slot) pairs computed here
  size_t slots() const { return static_cast<size_t>(plan_.T) * plan_.k; }
  size_t es() const { return dtype_size(layer_->compute()); }

  // What both passes use: the workers' scratch, the per-expert packed LoRA operands, the per-slot output rows and
  // the expert-major B factors, sized as the core carves them.
  void reserve_common() {
    const Backend& core = *layer_->backend_;
    Plan& p = plan_;
    p.scratch_bytes = core.scratch_bytes(layer_->compute(), p);
    p.scratch = static_cast<char*>(ex_.scratch.reserve(p.scratch_bytes * ex_.pool.threads()));
    p.lora_pk_stride = core.lora_operand_elems(p);
    p.lora_pk = ex_.lora_pk.reserve(p.lora_pk_stride * p.E * es());
    p.rows_out = ex_.rows_out.reserve(slots() * p.Hp * es());
    p.gu_Bt = static_cast<float*>(ex_.gu_Bt.reserve(static_cast<size_t>(p.E) * p.gu.rank * 2 * p.I * 4));
    p.dn_Bt = static_cast<float*>(ex_.dn_Bt.reserve(static_cast<size_t>(p.E) * p.dn.rank * p.H * 4));
  }

  std::shared_ptr<const MoELayer> layer_;
  Executor& ex_;  // the layer's
  std::shared_ptr<ForwardContext> ctx_;
  const Pass& pass_;
  Plan plan_;
};

class ForwardJob : public LayerJob {
 public:
  ForwardJob(std::shared_ptr<const MoELayer> layer, std::shared_ptr<ForwardContext> ctx, const void* x, void* y,
             bool save)
      : LayerJob(layer, std::move(ctx), layer->backend_->forward[static_cast<int>(layer->compute())]) {
    plan_.x = x;
    plan_.y = y;
    plan_.save = save;
  }
  void finish(bool completed) override {
    if (!completed) ctx_->unusable = true;
    LayerJob::finish(completed);
  }

 private:
  void reserve() override {
    Plan& p = plan_;
    ex_.lora_layout_of = 0;  // until this job has made the layout, should a reserve below fail
    reserve_common();
    ForwardContext& c = *ctx_;
    const size_t R = rows(), s = es();
    // Kept for the backward when saving, else in the executor's scratch.
    SavedActivations& a = p.save ? *c.saved : ex_.activations;
    p.X = a.X.reserve(R * p.ldh * s);
    p.Z = a.Z.reserve(R * p.ldi * s);
    p.ag = static_cast<float*>(a.ag.reserve(R * p.r1p * 4));
    p.ad = static_cast<float*>(a.ad.reserve(R * p.r2p * 4));
    if (p.save) {
      p.dz_dg = a.dz_dg.reserve(R * p.ldi * s);
      p.dz_du = a.dz_du.reserve(R * p.ldi * s);
    }
    p.ag_s = ex_.ag_s.reserve(R * p.r1p * s);
    p.ad_s = ex_.ad_s.reserve(R * p.r2p * s);
    c.forward_id = ex_.lora_layout_of = ++ex_.forwards_run;
  }
};

class BackwardJob : public LayerJob {
 public:
  BackwardJob(std::shared_ptr<const MoELayer> layer, std::shared_ptr<ForwardContext> ctx, const void* dy, void* dx,
              float* dw, const LoraGradArgs& grads)
      : LayerJob(layer, std::move(ctx), layer->backend_->backward[static_cast<int>(layer->compute())]) {
    plan_.dy = dy;
    plan_.dx = dx;
    plan_.dw = dw;
    plan_.gu_grad = grads.gu;
    plan_.dn_grad = grads.dn;
    plan_.grad_accumulate = grads.accumulate;
    const SavedActivations& a = *ctx_->saved;
    plan_.X = a.X.data();
    plan_.Z = a.Z.data();
    plan_.dz_dg = a.dz_dg.data();
    plan_.dz_du = a.dz_du.data();
    plan_.ag = static_cast<float*>(a.ag.data());
    plan_.ad = static_cast<float*>(a.ad.data());
  }

 private:
  void reserve() override {
    Plan& p = plan_;
    // The forward's layout is still there when no job has made another since and the buffers stayed put: the
    // factors as the forward used them (they must not change before its backward; if they do, a backward that
    // redoes the layout sees them as they are now).
    const void* layout[2] = {ex_.gu_Bt.data(), ex_.dn_Bt.data()};
    const bool layout_kept = ex_.lora_layout_of == ctx_->forward_id;
    ex_.lora_layout_of = 0;  // until this job has made the layout, should a reserve below fail
    reserve_common();
    const size_t R = rows(), s = es();
    p.dY = ex_.dY.reserve(R * p.ldh * s);
    p.dw_parts = static_cast<float*>(ex_.dw_parts.reserve(R * p.column_blocks(p.Ip) * 4));
    p.dG = ex_.dG.reserve(R * p.ldi * s);
    p.dU = ex_.dU.reserve(R * p.ldi * s);
    p.bdy = static_cast<float*>(ex_.bdy.reserve(R * p.r2p * 4));
    p.bdy_s = ex_.bdy_s.reserve(R * p.r2p * s);
    p.gbg = static_cast<float*>(ex_.gbg.reserve(R * p.r1p * 4));
    p.gbg_s = ex_.gbg_s.reserve(R * p.r1p * s);
    p.gu_Gt = static_cast<float*>(ex_.gu_Gt.reserve(static_cast<size_t>(p.E) * p.gu.rank * 2 * p.I * 4));
    p.dn_Gt = static_cast<float*>(ex_.dn_Gt.reserve(static_cast<size_t>(p.E) * p.dn.rank * p.H * 4));
    p.lora_layout_ready = layout_kept && layout[0] == p.gu_Bt && layout[1] == p.dn_Bt;
    ex_.lora_layout_of = ctx_->forward_id;
  }
};

MoELayer::Submitted MoELayer::submit_forward(int T, int k, const void* x, DType io, const int64_t* ids,
                                             const float* weights, void* y, bool save, const LoraArgs& lora) {
  if (T < 0) fail("token count must be >= 0");
  if (k < 1) fail("top-k must be >= 1");
  if (T > 0 && (!x || !ids || !weights || !y)) fail("missing input or output");
  check_lora(lora.gu, "gate_up");
  check_lora(lora.dn, "down");
  auto ctx = std::make_shared<ForwardContext>();
  ctx->T = T;
  ctx->k = k;
  ctx->io = io;
  ctx->lora.gu = lora.gu;
  ctx->lora.dn = lora.dn;
  ctx->lora.r1p = static_cast<int>(round_up(lora.gu.rank, kPad));
  ctx->lora.r2p = static_cast<int>(round_up(lora.dn.rank, kPad));
  ctx->layer = shared_from_this();
  ctx->layer_name = name_;
  // Group the (token, slot) pairs by expert with a stable counting sort. Slots with id -1 are computed elsewhere
  // (another executor tier): they get no row, and the slot sum leaves them out.
  const size_t R = static_cast<size_t>(T) * k;
  ctx->offsets.assign(E_ + 1, 0);
  for (size_t i = 0; i < R; ++i) {
    const int64_t e = ids[i];
    if (e == -1) {
      if (ctx->slot_present.empty()) ctx->slot_present.assign(R, 1);
      ctx->slot_present[i] = 0;
      continue;
    }
    if (e < 0 || e >= E_)
      fail("expert id " + std::to_string(e) + " at token " + std::to_string(i / k) + ", slot " +
           std::to_string(i % k) + " is out of range [0, " + std::to_string(E_) + ") (or -1: skipped)");
    ++ctx->offsets[e + 1];
  }
  for (int e = 0; e < E_; ++e) {
    if (ctx->offsets[e + 1]) ctx->active.push_back(e);
    ctx->offsets[e + 1] += ctx->offsets[e];
  }
  ctx->row_src.resize(ctx->offsets[E_]);
  ctx->row_weight.resize(ctx->offsets[E_]);
  std::vector<int64_t> fill(ctx->offsets.begin(), ctx->offsets.end() - 1);
  for (size_t i = 0; i < R; ++i) {
    if (ids[i] == -1) continue;
    const int64_t r = fill[ids[i]]++;
    ctx->row_src[r] = static_cast<int32_t>(i);
    ctx->row_weight[r] = weights[i];
  }
  if (save) {
    ctx->cache = exec_->cache;
    ctx->saved = exec_->cache->take();
  }
  auto job = std::make_shared<ForwardJob>(shared_from_this(), ctx, x, y, save);
  exec_->pool.submit(job);
  return {job, save ? ctx : nullptr};
}

MoELayer::Submitted MoELayer::submit_backward(std::shared_ptr<ForwardContext> ctx, const void* dy, void* dx,
                                              float* dw, const LoraGradArgs& grads) {
  if (!ctx) fail("backward needs the context of a forward run with save_for_backward=True");
  if (ctx->layer.lock().get() != this)
    fail("backward got a context made by the forward of layer '" + ctx->layer_name + "', not of this layer ('" +
         name_ + "')");
  if (ctx->unusable) fail("the forward that made this context was cancelled or failed: its activations are unusable");
  if (ctx->T > 0 && (!dy || !dx || !dw)) fail("missing gradient input or output");
  if (ctx->lora.gu.rank > 0 && (!grads.gu.A || !grads.gu.B)) fail("gate_up LoRA gradient buffers are missing");
  if (ctx->lora.dn.rank > 0 && (!grads.dn.A || !grads.dn.B)) fail("down LoRA gradient buffers are missing");
  for (size_t i = 0; i < ctx->slot_present.size(); ++i)  // a skipped slot's routing weight has no gradient here
    if (!ctx->slot_present[i]) dw[i] = 0.f;
  auto job = std::make_shared<BackwardJob>(shared_from_this(), std::move(ctx), dy, dx, dw, grads);
  exec_->pool.submit(job);
  return {job, nullptr};
}

}  // namespace kt
