// Host-side launchers of the ippo CUDA kernels. Plain C++ (no torch): tensors cross as raw pointers.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace ippo {

// Must match DTYPE_CODES in ippo/kernels/cuda_backend.py.
enum DType : int { kF16 = 0, kBF16 = 1, kF32 = 2, kF64 = 3 };

inline int dtype_size(int dtype) { return dtype == kF64 ? 8 : dtype == kF32 ? 4 : 2; }

// A 2-D strided matrix: element (i, j) at ptr + (i * s0 + j * s1) * dtype_size(dtype). Strides in elements.
struct Mat {
  const void* ptr;
  int dtype;
  int64_t s0;
  int64_t s1;
};

// out[t * out_stride] += grad_h[t] . (val_A x[t]) + scaling * grad_y[t] . (val_B h[t]),  t < n.
// x (n, d_in), h (n, r), gy (n, d_out), gh (n, r), va (r, d_in), vb (d_out, r); out fp32 or fp64
// (the accumulation dtype). cc_major: compute capability of the current device (tensor cores if >= 8).
cudaError_t launch_token_influence(Mat x, Mat h, Mat gy, Mat gh, Mat va, Mat vb, void* out, int out_dtype,
                                   int64_t out_stride, int64_t n, int64_t d_in, int64_t d_out, int64_t r,
                                   double scaling, int cc_major, cudaStream_t stream);

// out[t, j] = inv_sqrt_m * sum_c sign(j, c) x[t, c] for t < n, j < m; out fp32 or fp64.
cudaError_t launch_project_rows(Mat x, void* out, int out_dtype, int64_t so0, int64_t so1, int64_t n, int64_t d,
                                int64_t m, uint32_t salt, double inv_sqrt_m, cudaStream_t stream);

// The same signs on the host, out[j * d + c] = sign(j, c) in {-1, +1}: lets CPU-only CI check that the
// kernels' hash is projection.py's, bit for bit.
void projection_signs_host(uint32_t salt, int64_t m, int64_t d, int8_t* out);

}  // namespace ippo
