// Helpers shared by the CUDA kernels of pool_sample.cu and embed_layernorm.cu.
// Only c10/cuda headers (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE/cuSOLVER
// headers that these kernels do not need).
#pragma once
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace pixelbert {
namespace cuda {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 256;

// Threads of a block that spans `width` columns: a power of two from 32 to kMaxThreads.
inline int threads_for(int64_t width) {
  int threads = kWarp;
  while (threads < width && threads < kMaxThreads) threads *= 2;
  return threads;
}

// Blocks of a grid-stride loop over `rows`: enough to fill the GPU, never more than the rows.
inline int64_t blocks_for(int64_t rows, int threads) {
  const int device = c10::cuda::current_device();
  int sms = 0, threads_per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, device));
  const int64_t resident = static_cast<int64_t>(sms) * std::max(1, threads_per_sm / threads);
  return std::max<int64_t>(1, std::min<int64_t>(rows, resident));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum of `v` over the block (blockDim.x a multiple of 32), returned to every thread. `shared`
// holds kWarp + 1 floats; the leading __syncthreads lets a block call this back to back.
__device__ __forceinline__ float block_sum(float v, float* shared) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float s = lane < warps ? shared[lane] : 0.f;
    s = warp_sum(s);
    if (lane == 0) shared[kWarp] = s;
  }
  __syncthreads();
  return shared[kWarp];
}

// out[c] = sum over p < parts of partial[p * cols + c] (fp32), cast to scalar_t. Deterministic:
// a block of (32, 8) threads takes 32 columns; its 8 rows of threads split the parts.
template <typename scalar_t>
__global__ void sum_partials_kernel(const float* __restrict__ partial, int64_t parts, int64_t cols,
                                    scalar_t* __restrict__ out) {
  __shared__ float shared[8][kWarp + 1];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarp + threadIdx.x;
  float s = 0.f;
  if (c < cols) {
    for (int64_t p = threadIdx.y; p < parts; p += blockDim.y) s += partial[p * cols + c];
  }
  shared[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    float total = 0.f;
    for (int y = 0; y < static_cast<int>(blockDim.y); ++y) total += shared[y][threadIdx.x];
    out[c] = static_cast<scalar_t>(total);
  }
}

template <typename scalar_t>
void sum_partials(const float* partial, int64_t parts, int64_t cols, scalar_t* out,
                  cudaStream_t stream) {
  const dim3 block(kWarp, 8);
  const dim3 grid(static_cast<unsigned>((cols + kWarp - 1) / kWarp));
  sum_partials_kernel<scalar_t><<<grid, block, 0, stream>>>(partial, parts, cols, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace pixelbert
