// Sketch projection: out[t, j] = inv_sqrt_m * sum_c sign(j, c) x[t, c], sign from the hash of
// ippo/kernels/projection.py, regenerated tile by tile in shared memory and never stored globally.
// Same math as ippo/kernels/triton_sketch.py: signs are exact, products exact, accumulation in A
// (fp32, or fp64 for fp64 inputs). Register-tiled CUDA-core kernel: a 256-thread block computes a
// 64-token x 64-column tile, 4 x 4 outputs per thread.
#include "common.cuh"

namespace ippo {
namespace {

constexpr int kBN = 64;   // tokens per block
constexpr int kBM = 64;   // projection rows (sketch columns) per block
constexpr int kBK = 16;   // features per step
constexpr int kThreads = 256;

template <class A>
__global__ void __launch_bounds__(kThreads)
project_rows_kernel(Mat x, A* __restrict__ out, int64_t so0, int64_t so1, int64_t n, int d, int m, uint32_t salt,
                    A inv_sqrt_m) {
  __shared__ A sx[kBK][kBN + 1];  // x tile, feature-major
  __shared__ A ss[kBK][kBM];      // sign tile: ss[c][j] = sign(j0 + j, k0 + c)
  const int tid = threadIdx.x;
  const int tx = tid % 16;  // columns tx + 16 * i
  const int ty = tid / 16;  // tokens  ty + 16 * i
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const int j0 = blockIdx.y * kBM;
  const int rows_valid = static_cast<int>(n - row0 < kBN ? n - row0 : kBN);

  A acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int q = 0; q < 4; ++q) acc[i][q] = A(0);

  for (int k0 = 0; k0 < d; k0 += kBK) {
#pragma unroll
    for (int e = tid; e < kBN * kBK; e += kThreads) {
      const int i = e / kBK, c = e % kBK;
      sx[c][i] = (i < rows_valid && k0 + c < d)
                     ? load_as<A>(x.ptr, x.dtype, (row0 + i) * x.s0 + static_cast<int64_t>(k0 + c) * x.s1) : A(0);
    }
#pragma unroll
    for (int e = tid; e < kBK * kBM; e += kThreads) {
      const int c = e / kBM, j = e % kBM;
      ss[c][j] = sign_negative(static_cast<uint32_t>(j0 + j), static_cast<uint32_t>(k0 + c), salt) ? A(-1) : A(1);
    }
    __syncthreads();
    A step[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int q = 0; q < 4; ++q) step[i][q] = A(0);
#pragma unroll
    for (int c = 0; c < kBK; ++c) {
      A xa[4], sb[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) xa[i] = sx[c][ty + 16 * i];
#pragma unroll
      for (int q = 0; q < 4; ++q) sb[q] = ss[c][tx + 16 * q];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int q = 0; q < 4; ++q) step[i][q] += xa[i] * sb[q];
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[i][q] += step[i][q];
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int t = ty + 16 * i;
    if (t >= rows_valid) continue;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int j = j0 + tx + 16 * q;
      if (j < m) out[(row0 + t) * so0 + static_cast<int64_t>(j) * so1] = acc[i][q] * inv_sqrt_m;
    }
  }
}

}  // namespace

cudaError_t launch_project_rows(Mat x, void* out, int out_dtype, int64_t so0, int64_t so1, int64_t n, int64_t d,
                                int64_t m, uint32_t salt, double inv_sqrt_m, cudaStream_t stream) {
  if (n <= 0 || m <= 0) return cudaSuccess;
  if (d > INT32_MAX || m > INT32_MAX || ceil_div(n, kBN) > INT32_MAX || ceil_div(m, kBM) > 65535) {
    return cudaErrorInvalidValue;
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(n, kBN)), static_cast<unsigned>(ceil_div(m, kBM)));
  if (out_dtype == kF64) {
    project_rows_kernel<double><<<grid, kThreads, 0, stream>>>(x, static_cast<double*>(out), so0, so1, n,
                                                               static_cast<int>(d), static_cast<int>(m), salt,
                                                               inv_sqrt_m);
  } else {
    project_rows_kernel<float><<<grid, kThreads, 0, stream>>>(x, static_cast<float*>(out), so0, so1, n,
                                                              static_cast<int>(d), static_cast<int>(m), salt,
                                                              static_cast<float>(inv_sqrt_m));
  }
  return cudaGetLastError();
}

void projection_signs_host(uint32_t salt, int64_t m, int64_t d, int8_t* out) {
  for (int64_t j = 0; j < m; ++j) {
    for (int64_t c = 0; c < d; ++c) {
      out[j * d + c] = sign_negative(static_cast<uint32_t>(j), static_cast<uint32_t>(c), salt) ? -1 : 1;
    }
  }
}

}  // namespace ippo
