// pool_sample for CUDA tensors (the op, its tie rule and its layouts: see pool_sample.cpp).
// Named *_cuda.cu: setuptools names objects after the source's stem, so a .cu beside a .cpp of
// the same stem would overwrite its object file in a CUDA build.
//
// Forward: a grid-stride loop of blocks over the sampled rows, the threads of a block along the
// channels; each thread reads its channel's 2x2 window (64-bit offsets from feat's strides, so
// NCHW and channels-last are read in place), writes max (+ type) into the output row and the
// window arg-max (uint8) for the backward.
// Backward: one block per chunk of kRowsPerChunk rows, threads along the channels: each thread
// copies its rows' gradients to their arg-max in grad_feat (zeros) and sums them in fp32 into
// the chunk's partial row; a second kernel adds the partial rows up (deterministic, no atomics)
// into the type embedding's gradient.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda_common.cuh"
#include "ops.h"

namespace pixelbert {
namespace {

constexpr int64_t kRowsPerChunk = 32;

template <typename scalar_t>
__global__ void pool_forward_kernel(const scalar_t* __restrict__ feat, PoolGeometry g,
                                    IndexView index, int64_t rows,
                                    const scalar_t* __restrict__ type, scalar_t* __restrict__ out,
                                    int64_t out_stride, int64_t out_rows, IndexView out_index,
                                    uint8_t* __restrict__ argmax) {
  for (int64_t i = blockIdx.x; i < rows; i += gridDim.x) {
    const int64_t cell = index[i];
    const int64_t row = out_index.present() ? out_index[i] : i;
    // Out-of-range values are undefined behaviour (PIXELBERT_DEBUG=1 checks them); skip the
    // row rather than touch memory outside the tensors.
    if (cell < 0 || cell >= g.cells || row < 0 || row >= out_rows) continue;
    const scalar_t* window = feat + g.window_offset(cell);
    scalar_t* dst = out + row * out_stride;
    for (int64_t ch = threadIdx.x; ch < g.channels; ch += blockDim.x) {
      const scalar_t* q = window + ch * g.stride_c;
      float best = static_cast<float>(q[0]);
      uint8_t k = 0;
      // torch.max_pool2d's rule: strictly greater, or NaN (scan order 0, 1, 2, 3).
      const float v1 = static_cast<float>(q[g.stride_w]);
      if (v1 > best || isnan(v1)) { best = v1; k = 1; }
      const float v2 = static_cast<float>(q[g.stride_h]);
      if (v2 > best || isnan(v2)) { best = v2; k = 2; }
      const float v3 = static_cast<float>(q[g.stride_h + g.stride_w]);
      if (v3 > best || isnan(v3)) { best = v3; k = 3; }
      if (type != nullptr) best += static_cast<float>(type[ch]);
      dst[ch] = static_cast<scalar_t>(best);
      if (argmax != nullptr) argmax[i * g.channels + ch] = k;
    }
  }
}

template <typename scalar_t>
__global__ void pool_backward_kernel(const scalar_t* __restrict__ grad, int64_t grad_stride,
                                     int64_t grad_rows, IndexView grad_index, IndexView index,
                                     int64_t rows, int64_t channels,
                                     const uint8_t* __restrict__ argmax,
                                     scalar_t* __restrict__ grad_feat, PoolGeometry g,
                                     float* __restrict__ partial) {
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kRowsPerChunk;
  const int64_t end = min(rows, begin + kRowsPerChunk);
  for (int64_t ch = threadIdx.x; ch < channels; ch += blockDim.x) {
    float sum = 0.f;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = grad_index.present() ? grad_index[i] : i;
      if (row < 0 || row >= grad_rows) continue;
      const scalar_t v = grad[row * grad_stride + ch];
      sum += static_cast<float>(v);
      if (grad_feat != nullptr) {
        const int64_t cell = index[i];
        if (cell < 0 || cell >= g.cells) continue;
        const int k = argmax[i * channels + ch];
        grad_feat[g.window_offset(cell) + ch * g.stride_c + (k >> 1) * g.stride_h +
                  (k & 1) * g.stride_w] = v;
      }
    }
    if (partial != nullptr) partial[static_cast<int64_t>(blockIdx.x) * channels + ch] = sum;
  }
}

}  // namespace

void pool_sample_forward_cuda(const torch::Tensor& feat, const PoolGeometry& geom,
                              const torch::Tensor& index, const torch::Tensor& type_embedding,
                              torch::Tensor& out, const torch::Tensor& out_index,
                              torch::Tensor& argmax) {
  const c10::cuda::CUDAGuard guard(feat.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t rows = index.size(0);
  const int threads = cuda::threads_for(geom.channels);
  const auto blocks = static_cast<unsigned>(cuda::blocks_for(rows, threads));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feat.scalar_type(),
                                  "pool_sample_forward_cuda", [&] {
    pool_forward_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        feat.data_ptr<scalar_t>(), geom, index_view(index), rows,
        type_embedding.defined() ? type_embedding.data_ptr<scalar_t>() : nullptr,
        out.data_ptr<scalar_t>(), out.stride(0), out.size(0), index_view(out_index),
        argmax.defined() ? argmax.data_ptr<uint8_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void pool_sample_backward_cuda(const torch::Tensor& grad, const torch::Tensor& index,
                               const torch::Tensor& argmax, const torch::Tensor& out_index,
                               const PoolGeometry& geom, torch::Tensor& grad_feat,
                               torch::Tensor& grad_type) {
  const c10::cuda::CUDAGuard guard(grad.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t rows = index.size(0), channels = grad.size(1);
  const int64_t chunks = (rows + kRowsPerChunk - 1) / kRowsPerChunk;
  torch::Tensor partial;
  if (grad_type.defined()) partial = torch::empty({chunks, channels}, grad.options().dtype(torch::kFloat32));
  const int threads = cuda::threads_for(channels);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "pool_sample_backward_cuda", [&] {
    pool_backward_kernel<scalar_t><<<static_cast<unsigned>(chunks), threads, 0, stream>>>(
        grad.data_ptr<scalar_t>(), grad.stride(0), grad.size(0), index_view(out_index),
        index_view(index), rows, channels,
        grad_feat.defined() ? argmax.data_ptr<uint8_t>() : nullptr,
        grad_feat.defined() ? grad_feat.data_ptr<scalar_t>() : nullptr, geom,
        partial.defined() ? partial.data_ptr<float>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (grad_type.defined()) {
      cuda::sum_partials<scalar_t>(partial.data_ptr<float>(), chunks, channels,
                                   grad_type.data_ptr<scalar_t>(), stream);
    }
  });
}

}  // namespace pixelbert
