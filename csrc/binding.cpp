// pybind11 binding: raw pointers (tensor.data_ptr()) and sizes in, no torch headers; every call that waits or
// computes releases the GIL. kt_patch/kernel.py is the documented Python entry point over this.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <exception>

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

LoraRef lora_ref(uintptr_t A, uintptr_t B, const std::string& dtype, int rank, float scaling) {
  LoraRef l;
  l.A = ptr<void>(A);
  l.B = ptr<void>(B);
  l.dtype = parse_dtype(dtype);
  l.rank = rank;
  l.scaling = scaling;
  return l;
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

// A submitted job; wait() blocks without the GIL and returns the forward's context (or None).
struct Pending {
  MoELayer::Submitted submitted;
  py::object wait() {
    without_gil([this] {
      submitted.job->wait();
      return 0;
    });
    return submitted.context ? py::cast(submitted.context) : py::none();
  }
};

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "kt_patch CPU expert kernel";
  m.def("supported_isas", &supported_isas, "ISA backends this CPU runs, best first");
  m.def(
      "profile",
      [](bool reset) {
        py::dict out;
        for (const auto& p : profile(reset)) out[py::str(p.name)] = py::make_tuple(p.seconds, p.calls);
        return out;
      },
      py::arg("reset") = false, "{phase: (seconds, calls)} when KT_PROFILE is set");
  m.def("live_contexts", &ForwardContext::live, "forward contexts (activation caches) alive in the process");
  m.def("cached_activation_bytes", &cached_activation_bytes, "bytes of freed activation caches kept for reuse");
  m.def("release_cached_activations", &release_cached_activations, py::call_guard<py::gil_scoped_release>(),
        "hand the freed activation caches back to the system");

  py::class_<ForwardContext, std::shared_ptr<ForwardContext>>(m, "ForwardContext")
      .def_readonly("tokens", &ForwardContext::T)
      .def_readonly("top_k", &ForwardContext::k);

  py::class_<Pending>(m, "Pending").def("wait", &Pending::wait);

  py::class_<MoELayer, std::shared_ptr<MoELayer>>(m, "MoELayer")
      .def(py::init([](const std::string& name, int E, int H, int I, uintptr_t gate_up, uintptr_t down,
                       const std::string& dtype, const std::string& isa, int threads, const std::string& activation,
                       float alpha, float limit, uintptr_t gate_up_bias, uintptr_t down_bias,
                       bool gate_up_lora_interleaved, bool backward_copy) {
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
             return without_gil([&] {
               return std::make_shared<MoELayer>(name, E, H, I, ptr<void>(gate_up), ptr<void>(down), weight_dtype,
                                                 isa, threads, act, backward_copy);
             });
           }),
           py::arg("name"), py::arg("experts"), py::arg("hidden"), py::arg("intermediate"), py::arg("gate_up"),
           py::arg("down"), py::arg("dtype"), py::arg("isa"), py::arg("threads"), py::arg("activation") = "swiglu",
           py::arg("alpha") = 0.f, py::arg("limit") = 0.f, py::arg("gate_up_bias") = 0, py::arg("down_bias") = 0,
           py::arg("gate_up_lora_interleaved") = false, py::arg("backward_copy") = false)
      .def_property_readonly("isa", &MoELayer::isa)
      .def_property_readonly("threads", &MoELayer::threads)
      .def_property_readonly("weight_bytes", &MoELayer::weight_bytes)
      .def(
          "submit_forward",
          [](MoELayer& L, int T, int k, uintptr_t x, const std::string& io, uintptr_t ids, uintptr_t w, uintptr_t y,
             bool save, py::tuple gu, py::tuple dn) {
            LoraArgs lora{lora_ref(gu[0].cast<uintptr_t>(), gu[1].cast<uintptr_t>(), gu[2].cast<std::string>(),
                                   gu[3].cast<int>(), gu[4].cast<float>()),
                          lora_ref(dn[0].cast<uintptr_t>(), dn[1].cast<uintptr_t>(), dn[2].cast<std::string>(),
                                   dn[3].cast<int>(), dn[4].cast<float>())};
            const DType io_dtype = parse_dtype(io);
            return Pending{without_gil([&] {
              return L.submit_forward(T, k, ptr<void>(x), io_dtype, ptr<int64_t>(ids), ptr<float>(w),
                                      reinterpret_cast<void*>(y), save, lora);
            })};
          },
          "Start a forward; LoRA tuples are (A_ptr, B_ptr, dtype, rank, scaling) in PEFT layout")
      .def(
          "submit_backward",
          [](MoELayer& L, std::shared_ptr<ForwardContext> ctx, uintptr_t dy, uintptr_t dx, uintptr_t dw,
             uintptr_t gu_A, uintptr_t gu_B, uintptr_t dn_A, uintptr_t dn_B, bool accumulate) {
            LoraGradArgs grads{{reinterpret_cast<float*>(gu_A), reinterpret_cast<float*>(gu_B)},
                               {reinterpret_cast<float*>(dn_A), reinterpret_cast<float*>(dn_B)},
                               accumulate};
            return Pending{without_gil([&] {
              return L.submit_backward(std::move(ctx), ptr<void>(dy), reinterpret_cast<void*>(dx),
                                       reinterpret_cast<float*>(dw), grads);
            })};
          },
          py::arg("ctx"), py::arg("dy"), py::arg("dx"), py::arg("dw"), py::arg("gu_A"), py::arg("gu_B"),
          py::arg("dn_A"), py::arg("dn_B"), py::arg("accumulate") = true,
          "Start a backward; LoRA gradients are added into the fp32 buffers, or written over them")
      .def("export_weights", [](const MoELayer& L, uintptr_t gate_up, uintptr_t down) {
        without_gil([&] {
          L.export_weights(reinterpret_cast<void*>(gate_up), reinterpret_cast<void*>(down));
          return 0;
        });
      });
}
