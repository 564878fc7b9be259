// Python binding of the CPU kernel: addresses and sizes in, nothing of PyTorch needed to build.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "soft_values_cpu.h"

namespace py = pybind11;

namespace {

int simd_from_name(const std::string& name) {
  if (name == "auto") return endokern::best_simd();
  for (int s = endokern::kPortable; s <= endokern::kAvx512Bf16; ++s)
    if (name == endokern::simd_name(s)) return s;
  throw std::invalid_argument("unknown SIMD path '" + name + "' (auto, portable, avx2, avx512, avx512_bf16)");
}

void soft_values(uintptr_t hidden, int64_t hidden_row_stride, uintptr_t weight, int64_t weight_row_stride,
                 int dtype, uintptr_t bias, uintptr_t targets, int64_t n, int64_t d, int64_t v, double alpha,
                 double softcap, bool with_entropy, uintptr_t value, uintptr_t target_logit, uintptr_t entropy,
                 const std::string& simd, int threads, uintptr_t logit_sum) {
  endokern::Problem pb;
  pb.hidden = reinterpret_cast<const void*>(hidden);
  pb.hidden_row_stride = hidden_row_stride;
  pb.weight = reinterpret_cast<const void*>(weight);
  pb.weight_row_stride = weight_row_stride;
  pb.dtype = dtype;
  pb.bias = reinterpret_cast<const float*>(bias);
  pb.targets = reinterpret_cast<const int64_t*>(targets);
  pb.n = n;
  pb.d = d;
  pb.v = v;
  pb.alpha = static_cast<float>(alpha);
  pb.softcap = static_cast<float>(softcap);
  pb.with_entropy = with_entropy;
  pb.value = reinterpret_cast<float*>(value);
  pb.target_logit = reinterpret_cast<float*>(target_logit);
  pb.entropy = reinterpret_cast<float*>(entropy);
  pb.with_logit_sum = logit_sum != 0;  // a buffer given: sum_j z_j per row is asked for
  pb.logit_sum = reinterpret_cast<float*>(logit_sum);
  const int path = simd_from_name(simd);
  py::gil_scoped_release release;
  endokern::soft_values(pb, path, threads);
}

std::vector<std::string> supported_simd() {
  std::vector<std::string> names;
  for (int s = endokern::kPortable; s <= endokern::kAvx512Bf16; ++s)
    if (endokern::simd_supported(s)) names.emplace_back(endokern::simd_name(s));
  return names;
}

}  // namespace

PYBIND11_MODULE(_cpu_kernel, m) {
  m.doc() = "endokern's fused soft-value kernel for CPUs (see csrc/soft_values_cpu.h)";
  m.def("soft_values", &soft_values, "Run the kernel on raw buffers; see endokern/ops/cpu_backend.py",
        py::arg("hidden"), py::arg("hidden_row_stride"), py::arg("weight"), py::arg("weight_row_stride"),
        py::arg("dtype"), py::arg("bias"), py::arg("targets"), py::arg("n"), py::arg("d"), py::arg("v"),
        py::arg("alpha"), py::arg("softcap"), py::arg("with_entropy"), py::arg("value"),
        py::arg("target_logit"), py::arg("entropy"), py::arg("simd") = "auto", py::arg("threads") = 0,
        py::arg("logit_sum") = 0);
  m.def("supported_simd", &supported_simd, "The SIMD paths this CPU runs, best last");
}
