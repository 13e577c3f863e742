// pybind11 binding: raw pointers (tensor.data_ptr()) and sizes in, no torch headers; every call that waits or
// computes releases the GIL. kt_patch/kernel.py is the documented Python entry point over this.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <exception>
#include <optional>

#include "moe_layer.h"

namespace py = pybind11;
using namespace kt;

namespace {

DType parse_dtype(const std::string& s) {
  if (s == "bf16") return DType::bf16;
  if (s == "f32") return DType::f32;
  throw std::invalid_argument("dtype must be 'bf16' or 'f32', got '" + s + "'");
}

template <class T>
const T* ptr(uintptr_t p) {
  return reinterpret_cast<const T*>(p);
}

// Runs f without the GIL. An exception is carried out of the released region and rethrown with the GIL held, so
// pybind11 translates it (std::invalid_argument -> ValueError) in a fully restored interpreter state.
template <class F>
auto without_gil(F&& f) -> decltype(f()) {
  std::exception_ptr error;
  decltype(f()) result{};
  {
    py::gil_scoped_release release;
    try {
      result = f();
    } catch (...) {
      error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
  return result;
}

LoraRef make_lora(uintptr_t A, uintptr_t B, const std::string& dtype, int rank, float scaling) {
  if (rank < 1) throw std::invalid_argument("LoRA rank must be >= 1, got " + std::to_string(rank));
  if (!A || !B) throw std::invalid_argument("LoRA factor pointers must not be null");
  LoraRef l;
  l.A = ptr<void>(A);
  l.B = ptr<void>(B);
  l.dtype = parse_dtype(dtype);
  l.rank = rank;
  l.scaling = scaling;
  return l;
}

// A submitted job, holding what it reads and writes (`keep`: the caller's tensors) until it is done. Dropped
// without wait(), it waits first, so the job never writes memory Python has freed. wait() wakes every
// kSignalPoll with the GIL to run Python's signal handlers: on an exception from one (KeyboardInterrupt), it
// cancels the job, waits for the workers to leave it, and raises that exception. wait() may be called again: it
// returns the same result, or raises the job's error (a RuntimeError for a cancelled job).
class Pending {
 public:
  static constexpr std::chrono::milliseconds kSignalPoll{50};

  Pending(MoELayer::Submitted submitted, py::object keep)
      : job_(std::move(submitted.job)), context_(std::move(submitted.context)), keep_(std::move(keep)) {}
  Pending(const Pending&) = delete;
  Pending& operator=(const Pending&) = delete;
  ~Pending() {
    if (done_) return;
    py::gil_scoped_release release;
    try {
      job_->wait();
    } catch (...) {  // its error has no one to go to; a fork child's job never finishes, nor needs to be waited for
    }
  }

  py::object wait() {
    for (;;) {
      const bool done = without_gil([this] { return job_->wait_for(kSignalPoll); });
      if (done) break;
      if (PyErr_CheckSignals() != 0) {
        py::error_already_set interrupt;  // takes the Python error out of the interpreter until rethrown
        job_->cancel();
        without_gil([this] {
          while (!job_->wait_for(kSignalPoll)) {  // until the workers have left it (its error: the cancel)
          }
          return 0;
        });
        release();
        throw interrupt;
      }
    }
    release();
    without_gil([this] {
      job_->wait();  // done: rethrows its error, if any
      return 0;
    });
    return context_ ? py::cast(context_) : py::none();
  }

  double run_seconds() const { return job_->run_seconds(); }

 private:
  void release() {
    done_ = true;
    keep_ = py::none();
  }

  std::shared_ptr<Job> job_;
  std::shared_ptr<ForwardContext> context_;
  py::object keep_;
  bool done_ = false;  // the job is done (keep_ released)
};

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "kt_patch CPU expert kernel";
  m.def("supported_isas", &supported_isas, "ISA backends this CPU runs, best first");
  m.def("set_profiling", &set_profiling, py::arg("on"), "time each kernel phase from now on (off by default)");
  m.def(
      "profile",
      [](bool reset) {
        py::dict out;
        for (const auto& p : profile(reset)) out[py::str(p.name)] = py::make_tuple(p.seconds, p.calls);
        return out;
      },
      py::arg("reset") = false, "{phase: (seconds, calls)} timed while profiling was on; reset: start again");
  m.def("live_contexts", &ForwardContext::live, "forward contexts (activation caches) alive in the process");
  m.def("cached_activation_bytes", &cached_activation_bytes, "bytes of freed activation caches kept for reuse");
  m.def("release_cached_activations", &release_cached_activations, py::call_guard<py::gil_scoped_release>(),
        "hand the freed activation caches back to the system");

  py::class_<ForwardContext, std::shared_ptr<ForwardContext>>(m, "ForwardContext")
      .def_readonly("tokens", &ForwardContext::T)
      .def_readonly("top_k", &ForwardContext::k);

  py::class_<Pending>(m, "Pending")
      .def("wait", &Pending::wait,
           "Block until the job is done (Ctrl-C cancels it); the forward's context or None. Again: the same result, "
           "or the job's error")
      .def_property_readonly("run_seconds", &Pending::run_seconds,
                             "seconds the workers spent on the job (not queued), once wait() has returned");

  py::class_<LoraRef>(m, "LoraFactors", "The LoRA factors of one projection, read in place (PEFT layout)")
      .def(py::init(&make_lora), py::arg("A"), py::arg("B"), py::arg("dtype"), py::arg("rank"), py::arg("scaling"))
      .def_property_readonly("A", [](const LoraRef& l) { return reinterpret_cast<uintptr_t>(l.A); })
      .def_property_readonly("B", [](const LoraRef& l) { return reinterpret_cast<uintptr_t>(l.B); })
      .def_property_readonly("dtype", [](const LoraRef& l) { return l.dtype == DType::bf16 ? "bf16" : "f32"; })
      .def_readonly("rank", &LoraRef::rank)
      .def_readonly("scaling", &LoraRef::scaling);

  m.def("remove_stale_shared_weights", &SharedSegment::remove_stale, py::arg("prefix"),
        "Remove /dev/shm segments of this prefix whose creator exited (this user, this pid namespace); how many");

  py::class_<MoELayer, std::shared_ptr<MoELayer>>(m, "MoELayer")
      .def(py::init([](const std::string& name, int E, int H, int I, uintptr_t gate_up, uintptr_t down,
                       const std::string& dtype, const std::string& isa, int threads, const std::string& activation,
                       float alpha, float limit, uintptr_t gate_up_bias, uintptr_t down_bias,
                       bool gate_up_lora_interleaved, bool backward_copy, const std::string& shared_name,
                       bool shared_create, int shared_ranks, double shared_timeout) {
             const DType weight_dtype = parse_dtype(dtype);
             ExpertActivation act;
             if (activation == "gpt_oss_swiglu")
               act.act = Activation::gpt_oss;
             else if (activation != "swiglu")
               throw std::invalid_argument("activation must be 'swiglu' or 'gpt_oss_swiglu', got '" + activation + "'");
             act.alpha = alpha;
             act.limit = limit;
             act.gate_up_bias = ptr<float>(gate_up_bias);
             act.down_bias = ptr<float>(down_bias);
             act.gate_up_lora_interleaved = gate_up_lora_interleaved;
             const SharedSpec shared{shared_name, shared_create, shared_ranks, shared_timeout};
             return without_gil([&] {
               return std::make_shared<MoELayer>(name, E, H, I, ptr<void>(gate_up), ptr<void>(down), weight_dtype,
                                                 isa, threads, act, backward_copy, shared);
             });
           }),
           py::arg("name"), py::arg("experts"), py::arg("hidden"), py::arg("intermediate"), py::arg("gate_up"),
           py::arg("down"), py::arg("dtype"), py::arg("isa"), py::arg("threads"), py::arg("activation") = "swiglu",
           py::arg("alpha") = 0.f, py::arg("limit") = 0.f, py::arg("gate_up_bias") = 0, py::arg("down_bias") = 0,
           py::arg("gate_up_lora_interleaved") = false, py::arg("backward_copy") = false,
           py::arg("shared_name") = "", py::arg("shared_create") = false, py::arg("shared_ranks") = 1,
           py::arg("shared_timeout") = 600.0)
      .def_property_readonly("shared_name", &MoELayer::shared_name,
                             "the /dev/shm segment (name) holding the packed weights for every local rank, or ''")
      .def_property_readonly("weights_read_only", &MoELayer::weights_read_only,
                             "whether the packed weights are another process's segment, mapped read-only")
      .def_property_readonly("isa", &MoELayer::isa)
      .def_property_readonly("threads", &MoELayer::threads)
      .def_property_readonly("weight_bytes", &MoELayer::weight_bytes)
      .def(
          "submit_forward",
          [](const std::shared_ptr<MoELayer>& L, int T, int k, uintptr_t x, const std::string& io, uintptr_t ids,
             uintptr_t w, uintptr_t y, bool save, std::optional<LoraRef> gate_up, std::optional<LoraRef> down,
             py::object keep) {
            const LoraArgs lora{gate_up.value_or(LoraRef{}), down.value_or(LoraRef{})};
            const DType io_dtype = parse_dtype(io);
            auto submitted = without_gil([&] {
              return L->submit_forward(T, k, ptr<void>(x), io_dtype, ptr<int64_t>(ids), ptr<float>(w),
                                       reinterpret_cast<void*>(y), save, lora);
            });
            return std::make_unique<Pending>(std::move(submitted), std::move(keep));
          },
          py::arg("T"), py::arg("k"), py::arg("x"), py::arg("io"), py::arg("ids"), py::arg("w"), py::arg("y"),
          py::arg("save"), py::arg("gate_up").none(true), py::arg("down").none(true), py::arg("keep"),
          "Start a forward (None: no LoRA on that projection); `keep` (the tensors it reads and writes) is held "
          "until it is done")
      .def(
          "submit_backward",
          [](const std::shared_ptr<MoELayer>& L, std::shared_ptr<ForwardContext> ctx, uintptr_t dy, uintptr_t dx,
             uintptr_t dw, uintptr_t gu_A, uintptr_t gu_B, uintptr_t dn_A, uintptr_t dn_B, bool accumulate,
             py::object keep) {
            LoraGradArgs grads{{reinterpret_cast<float*>(gu_A), reinterpret_cast<float*>(gu_B)},
                               {reinterpret_cast<float*>(dn_A), reinterpret_cast<float*>(dn_B)},
                               accumulate};
            auto submitted = without_gil([&] {
              return L->submit_backward(std::move(ctx), ptr<void>(dy), reinterpret_cast<void*>(dx),
                                        reinterpret_cast<float*>(dw), grads);
            });
            return std::make_unique<Pending>(std::move(submitted), std::move(keep));
          },
          py::arg("ctx"), py::arg("dy"), py::arg("dx"), py::arg("dw"), py::arg("gu_A"), py::arg("gu_B"),
          py::arg("dn_A"), py::arg("dn_B"), py::arg("accumulate"), py::arg("keep"),
          "Start a backward; LoRA gradients are added into the fp32 buffers, or written over them; `keep` is held "
          "until it is done")
      .def(
          "packed_weights",
          [](const MoELayer& L) {
            const MoELayer::PackedWeights w = L.packed_weights();
            const size_t es = MoELayer::dtype_size(L.compute()), E = L.experts();
            auto entry = [](const void* p, size_t bytes) {
              return py::make_tuple(reinterpret_cast<uintptr_t>(p), bytes);
            };
            py::dict out;
            out["gate"] = entry(w.gate, E * w.gate_up_stride * es);
            out["up"] = entry(w.up, E * w.gate_up_stride * es);
            out["down"] = entry(w.down, E * w.down_stride * es);
            return out;
          },
          "{'gate' | 'up' | 'down': (address, bytes)} of the forward's packed weights, read in place (valid while "
          "the layer lives); packed_layout() says how to read them")
      .def(
          "packed_layout",
          [](const MoELayer& L) {
            const MoELayer::PackedWeights w = L.packed_weights();
            py::dict out;
            out["dtype"] = L.compute() == DType::bf16 ? "bf16" : "f32";
            out["panel"] = kPanel;
            out["pair"] = L.compute() == DType::bf16 ? 2 : 1;
            out["Hp"] = L.padded_hidden();
            out["Ip"] = L.padded_intermediate();
            out["gate_up_stride"] = w.gate_up_stride;
            out["down_stride"] = w.down_stride;
            return out;
          },
          "How packed_weights() lie: per expert, gate and up are W[Ip][Hp] and down W[Hp][Ip] (zero padded), element "
          "(n, k) at ((n // panel) * (Kp // pair) + k // pair) * panel * pair + (n % panel) * pair + k % pair; "
          "experts gate_up_stride / down_stride elements apart")
      .def("export_weights", [](const MoELayer& L, uintptr_t gate_up, uintptr_t down) {
        without_gil([&] {
          L.export_weights(reinterpret_cast<void*>(gate_up), reinterpret_cast<void*>(down));
          return 0;
        });
      });
}
