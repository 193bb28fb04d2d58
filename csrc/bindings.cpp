// pybind11 module ippo._C. Tensors cross as raw device pointers + dtype codes + strides (in elements);
// the CUDA stream is passed as an integer handle. No libtorch: see csrc/README.md.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include <cuda_runtime_api.h>

#include "kernels.h"

#ifndef IPPO_CUDA_ARCHS
#define IPPO_CUDA_ARCHS ""
#endif

namespace py = pybind11;

namespace {

using MatTuple = std::tuple<uintptr_t, int, int64_t, int64_t>;  // (data_ptr, dtype code, stride 0, stride 1)

void check(cudaError_t err, const std::string& what) {
  if (err != cudaSuccess) {
    throw std::runtime_error("ippo._C." + what + ": CUDA error " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
  }
}

ippo::Mat to_mat(const MatTuple& t, const char* name) {
  const int dtype = std::get<1>(t);
  if (dtype < ippo::kF16 || dtype > ippo::kF64) throw py::value_error(std::string("bad dtype code for ") + name);
  return ippo::Mat{reinterpret_cast<const void*>(std::get<0>(t)), dtype, std::get<2>(t), std::get<3>(t)};
}

// Makes `device` current for this extension's CUDA runtime and restores the previous device on exit.
class DeviceGuard {
 public:
  DeviceGuard(int device, const std::string& what) : device_(device) {
    check(cudaGetDevice(&previous_), what);
    if (previous_ != device_) check(cudaSetDevice(device_), what);
  }
  ~DeviceGuard() {
    if (previous_ >= 0 && previous_ != device_) cudaSetDevice(previous_);
  }

 private:
  int device_;
  int previous_ = -1;
};

int cc_major(int device, const std::string& what) {
  int major = 0;
  check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), what);
  return major;
}

void token_influence(const MatTuple& x, const MatTuple& h, const MatTuple& gy, const MatTuple& gh, const MatTuple& va,
                     const MatTuple& vb, uintptr_t out, int out_dtype, int64_t out_stride, int64_t n, int64_t d_in,
                     int64_t d_out, int64_t r, double scaling, int device, uintptr_t stream) {
  const std::string what = "token_influence";
  if (n < 0 || d_in < 0 || d_out < 0 || r < 1) throw py::value_error(what + ": need n, d_in, d_out >= 0, r >= 1");
  if (out_dtype != ippo::kF32 && out_dtype != ippo::kF64) throw py::value_error(what + ": out must be fp32/fp64");
  const ippo::Mat mx = to_mat(x, "x"), mh = to_mat(h, "h"), mgy = to_mat(gy, "grad_y"), mgh = to_mat(gh, "grad_h"),
                  mva = to_mat(va, "val_A"), mvb = to_mat(vb, "val_B");
  if (n == 0) return;
  py::gil_scoped_release release;
  DeviceGuard guard(device, what);
  cudaGetLastError();  // clear a stale non-sticky error so the one reported below is ours
  check(ippo::launch_token_influence(mx, mh, mgy, mgh, mva, mvb, reinterpret_cast<void*>(out), out_dtype, out_stride,
                                     n, d_in, d_out, r, scaling, cc_major(device, what),
                                     reinterpret_cast<cudaStream_t>(stream)),
        what);
}

void project_rows(const MatTuple& x, uintptr_t out, int out_dtype, int64_t so0, int64_t so1, int64_t n, int64_t d,
                  int64_t m, uint32_t salt, double inv_sqrt_m, int device, uintptr_t stream) {
  const std::string what = "project_rows";
  if (n < 0 || d < 0 || m < 0) throw py::value_error("project_rows: need n, d, m >= 0");
  if (out_dtype != ippo::kF32 && out_dtype != ippo::kF64) throw py::value_error("project_rows: out must be fp32/fp64");
  const ippo::Mat mx = to_mat(x, "x");
  if (n == 0 || m == 0) return;
  py::gil_scoped_release release;
  DeviceGuard guard(device, what);
  cudaGetLastError();
  check(ippo::launch_project_rows(mx, reinterpret_cast<void*>(out), out_dtype, so0, so1, n, d, m, salt, inv_sqrt_m,
                                  reinterpret_cast<cudaStream_t>(stream)),
        what);
}

// (number of CUDA devices, "" or why there are none), without raising.
std::tuple<int, std::string> device_status() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return {0, std::string("cudaGetDeviceCount: ") + cudaGetErrorName(err) + ": " + cudaGetErrorString(err)};
  }
  if (count == 0) return {0, "cudaGetDeviceCount: 0 devices"};
  return {count, ""};
}

py::dict device_info(int device) {
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, device), "device_info");
  py::dict info;
  info["name"] = std::string(prop.name);
  info["major"] = prop.major;
  info["minor"] = prop.minor;
  info["multiprocessors"] = prop.multiProcessorCount;
  return info;
}

int driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) return 0;
  return v;
}

std::vector<std::string> split_archs(const std::string& s) {
  std::vector<std::string> out;
  std::string cur;
  for (char c : s) {
    if (c == ';' || c == ',') {
      if (!cur.empty()) out.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  if (!cur.empty()) out.push_back(cur);
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "ippo CUDA kernels (per-token LoRA influence, sketch projection); see csrc/README.md";
  mod.attr("cuda_version") = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
  mod.attr("archs") = split_archs(IPPO_CUDA_ARCHS);  // e.g. ["sm_80", "sm_90", "compute_90"]
  mod.attr("DTYPE_CODES") = py::dict(py::arg("float16") = int(ippo::kF16), py::arg("bfloat16") = int(ippo::kBF16),
                                     py::arg("float32") = int(ippo::kF32), py::arg("float64") = int(ippo::kF64));
  mod.def("token_influence", &token_influence,
          "out[t] += grad_h[t].(val_A x[t]) + scaling * grad_y[t].(val_B h[t]); matrices as (ptr, dtype, s0, s1)",
          py::arg("x"), py::arg("h"), py::arg("grad_y"), py::arg("grad_h"), py::arg("val_A"), py::arg("val_B"),
          py::arg("out"), py::arg("out_dtype"), py::arg("out_stride"), py::arg("n"), py::arg("d_in"),
          py::arg("d_out"), py::arg("r"), py::arg("scaling"), py::arg("device"), py::arg("stream"));
  mod.def("project_rows", &project_rows, "out[t, j] = inv_sqrt_m * sum_c sign(j, c) x[t, c]", py::arg("x"),
          py::arg("out"), py::arg("out_dtype"), py::arg("out_stride0"), py::arg("out_stride1"), py::arg("n"),
          py::arg("d"), py::arg("m"), py::arg("salt"), py::arg("inv_sqrt_m"), py::arg("device"), py::arg("stream"));
  mod.def(
      "projection_signs",
      [](uint32_t salt, int64_t m, int64_t d) {
        std::string out(static_cast<size_t>(m * d), '\0');
        ippo::projection_signs_host(salt, m, d, reinterpret_cast<int8_t*>(out.data()));
        return py::bytes(out);
      },
      "int8 bytes of sign(j, c), row-major (m, d), computed on the host with the kernels' hash", py::arg("salt"),
      py::arg("m"), py::arg("d"));
  mod.def("device_status", &device_status, "(device count, '' or why none) as this extension's runtime sees it");
  mod.def("device_info", &device_info, py::arg("device"));
  mod.def("driver_version", &driver_version, "cudaDriverGetVersion, 0 without a driver");
}
