// embed_layernorm for CUDA tensors (the op: see embed_layernorm.cpp).
// Named *_cuda.cu: setuptools names objects after the source's stem, so a .cu beside a .cpp of
// the same stem would overwrite its object file in a CUDA build.
//
// Forward: a grid-stride loop of blocks over the rows, threads along D. Per row: gather and sum
// the three table rows in fp32 (re-read from L1/L2 on each pass rather than held: no limit on D),
// block reductions for the mean and then the variance, normalise, affine, store; mean and rstd
// are kept (fp32) for the backward.
// Backward: the same layout. Per row: xhat and g = dy * weight recomputed, two block reductions
// (mean(g), mean(g * xhat)), dX = rstd * (g - mean(g) - xhat * mean(g * xhat)). dweight/dbias:
// each block adds its rows into its own fp32 partial row (no atomics), and a second kernel sums
// the partial rows. The table gradients: fp32 atomicAdd of dX into fp32 accumulators (the
// gradient itself for fp32 tables, else an fp32 buffer cast at the end). Atomics rather than a
// sort-based segmented reduction: one pass, no sort and no extra [N, D] buffer, and correct for
// any repetition of ids; a hot id (90% of the rows on one word) serialises its atomics per
// address in L2, which stays well below the row work at the engine's shapes. The price: the
// summation order of repeated ids, hence the last bits of the table gradients, varies run to run.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda_common.cuh"
#include "ops.h"

namespace pixelbert {
namespace {

template <typename scalar_t>
struct DeviceTables {
  const scalar_t *word, *position, *type;
  int64_t word_stride, position_stride, type_stride, words, positions, types;
  IndexView word_ids, position_ids, type_ids;

  // The table rows (ids) of row i, or false when an id is out of range (undefined behaviour
  // that PIXELBERT_DEBUG=1 reports; the kernels skip such a row rather than read outside a table).
  __device__ __forceinline__ bool ids_of(int64_t i, int64_t& w, int64_t& p, int64_t& t) const {
    w = word_ids[i];
    p = position_ids[i];
    t = type != nullptr ? type_ids[i] : 0;
    return w >= 0 && w < words && p >= 0 && p < positions &&
           (type == nullptr || (t >= 0 && t < types));
  }

  // word[w][d] + position[p][d] (+ type[t][d]) in fp32.
  __device__ __forceinline__ float summed(int64_t w, int64_t p, int64_t t, int64_t d) const {
    const float x = static_cast<float>(word[w * word_stride + d]) +
                    static_cast<float>(position[p * position_stride + d]);
    return type != nullptr ? x + static_cast<float>(type[t * type_stride + d]) : x;
  }
};

template <typename scalar_t>
DeviceTables<scalar_t> device_tables(const EmbedArgs& a) {
  const bool typed = a.token_type.defined();
  return DeviceTables<scalar_t>{
      a.word.data_ptr<scalar_t>(), a.position.data_ptr<scalar_t>(),
      typed ? a.token_type.data_ptr<scalar_t>() : nullptr, a.word.stride(0), a.position.stride(0),
      typed ? a.token_type.stride(0) : 0, a.word.size(0), a.position.size(0),
      typed ? a.token_type.size(0) : 0, index_view(a.input_ids), index_view(a.position_ids),
      index_view(a.token_type_ids)};
}

template <typename scalar_t>
__global__ void embed_forward_kernel(DeviceTables<scalar_t> tables, const float* __restrict__ weight,
                                     const float* __restrict__ bias, scalar_t* __restrict__ out,
                                     int64_t out_stride, int64_t out_rows, IndexView out_index,
                                     float* __restrict__ mean, float* __restrict__ rstd,
                                     int64_t rows, int64_t dim, float eps) {
  __shared__ float shared[cuda::kWarp + 1];
  for (int64_t i = blockIdx.x; i < rows; i += gridDim.x) {
    int64_t w, p, t;
    const int64_t row = out_index.present() ? out_index[i] : i;
    if (row < 0 || row >= out_rows || !tables.ids_of(i, w, p, t)) continue;  // block-uniform
    float s = 0.f;
    for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) s += tables.summed(w, p, t, d);
    const float mu = cuda::block_sum(s, shared) / dim;
    float q = 0.f;
    for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
      const float c = tables.summed(w, p, t, d) - mu;
      q += c * c;
    }
    const float rs = rsqrtf(cuda::block_sum(q, shared) / dim + eps);
    scalar_t* y = out + row * out_stride;
    for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
      y[d] = static_cast<scalar_t>((tables.summed(w, p, t, d) - mu) * rs * weight[d] + bias[d]);
    }
    if (threadIdx.x == 0) {
      mean[i] = mu;
      rstd[i] = rs;
    }
  }
}

template <typename scalar_t>
__global__ void embed_backward_kernel(DeviceTables<scalar_t> tables, const float* __restrict__ weight,
                                      const float* __restrict__ mean, const float* __restrict__ rstd,
                                      const scalar_t* __restrict__ grad, int64_t grad_stride,
                                      int64_t grad_rows, IndexView grad_index, int64_t rows,
                                      int64_t dim, float* __restrict__ partial_w,
                                      float* __restrict__ partial_b, float* __restrict__ acc_word,
                                      float* __restrict__ acc_position, float* __restrict__ acc_type) {
  __shared__ float shared[cuda::kWarp + 1];
  // This block's own partial rows of dweight / dbias: no other block writes them.
  float* pw = partial_w != nullptr ? partial_w + static_cast<int64_t>(blockIdx.x) * dim : nullptr;
  float* pb = partial_b != nullptr ? partial_b + static_cast<int64_t>(blockIdx.x) * dim : nullptr;
  for (int64_t i = blockIdx.x; i < rows; i += gridDim.x) {
    int64_t w, p, t;
    const int64_t row = grad_index.present() ? grad_index[i] : i;
    if (row < 0 || row >= grad_rows || !tables.ids_of(i, w, p, t)) continue;  // block-uniform
    const scalar_t* dy = grad + row * grad_stride;
    const float mu = mean[i], rs = rstd[i];
    float s1 = 0.f, s2 = 0.f;
    for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
      const float xhat = (tables.summed(w, p, t, d) - mu) * rs;
      const float g = static_cast<float>(dy[d]) * weight[d];
      s1 += g;
      s2 += g * xhat;
    }
    const float c1 = cuda::block_sum(s1, shared) / dim;
    const float c2 = cuda::block_sum(s2, shared) / dim;
    for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
      const float xhat = (tables.summed(w, p, t, d) - mu) * rs;
      const float dyd = static_cast<float>(dy[d]);
      if (pw != nullptr) pw[d] += dyd * xhat;
      if (pb != nullptr) pb[d] += dyd;
      const float dx = rs * (dyd * weight[d] - c1 - xhat * c2);
      if (acc_word != nullptr) atomicAdd(acc_word + w * dim + d, dx);
      if (acc_position != nullptr) atomicAdd(acc_position + p * dim + d, dx);
      if (acc_type != nullptr) atomicAdd(acc_type + t * dim + d, dx);
    }
  }
}

// The fp32 accumulator of a table's gradient: the gradient itself when fp32, else a buffer.
torch::Tensor accumulator(const torch::Tensor& grad) {
  if (!grad.defined() || grad.scalar_type() == torch::kFloat32) return grad;
  return torch::zeros(grad.sizes(), grad.options().dtype(torch::kFloat32));
}

float* float_ptr(const torch::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

}  // namespace

void embed_layernorm_forward_cuda(const EmbedArgs& args, double eps, torch::Tensor& out,
                                  const torch::Tensor& out_index, torch::Tensor& mean,
                                  torch::Tensor& rstd) {
  const c10::cuda::CUDAGuard guard(args.word.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int threads = cuda::threads_for(args.dim);
  const auto blocks = static_cast<unsigned>(cuda::blocks_for(args.rows, threads));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.word.scalar_type(),
                                  "embed_layernorm_forward_cuda", [&] {
    embed_forward_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        device_tables<scalar_t>(args), args.weight_f32.data_ptr<float>(),
        args.bias_f32.data_ptr<float>(), out.data_ptr<scalar_t>(), out.stride(0), out.size(0),
        index_view(out_index), mean.data_ptr<float>(), rstd.data_ptr<float>(), args.rows,
        args.dim, static_cast<float>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void embed_layernorm_backward_cuda(const EmbedArgs& args, const torch::Tensor& grad,
                                   const torch::Tensor& out_index, const torch::Tensor& mean,
                                   const torch::Tensor& rstd, torch::Tensor& grad_word,
                                   torch::Tensor& grad_position, torch::Tensor& grad_type,
                                   torch::Tensor& grad_weight, torch::Tensor& grad_bias) {
  const c10::cuda::CUDAGuard guard(args.word.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int threads = cuda::threads_for(args.dim);
  const int64_t blocks = cuda::blocks_for(args.rows, threads);
  const auto f32 = grad.options().dtype(torch::kFloat32);
  const torch::Tensor acc_word = accumulator(grad_word), acc_position = accumulator(grad_position),
                      acc_type = accumulator(grad_type);
  const torch::Tensor partial_w = grad_weight.defined() ? torch::zeros({blocks, args.dim}, f32) : torch::Tensor();
  const torch::Tensor partial_b = grad_bias.defined() ? torch::zeros({blocks, args.dim}, f32) : torch::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.word.scalar_type(),
                                  "embed_layernorm_backward_cuda", [&] {
    embed_backward_kernel<scalar_t><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        device_tables<scalar_t>(args), args.weight_f32.data_ptr<float>(), mean.data_ptr<float>(),
        rstd.data_ptr<float>(), grad.data_ptr<scalar_t>(), grad.stride(0), grad.size(0),
        index_view(out_index), args.rows, args.dim, float_ptr(partial_w), float_ptr(partial_b),
        float_ptr(acc_word), float_ptr(acc_position), float_ptr(acc_type));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  auto sum_into = [&](const torch::Tensor& partial, torch::Tensor& out) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(),
                                    "embed_layernorm_affine_grad_cuda", [&] {
      cuda::sum_partials<scalar_t>(partial.data_ptr<float>(), blocks, args.dim,
                                   out.data_ptr<scalar_t>(), stream);
    });
  };
  if (grad_weight.defined()) sum_into(partial_w, grad_weight);
  if (grad_bias.defined()) sum_into(partial_b, grad_bias);
  // Half tables: cast the fp32 accumulators into the gradients (fp32 ones accumulated in place).
  if (grad_word.defined() && !acc_word.is_same(grad_word)) grad_word.copy_(acc_word);
  if (grad_position.defined() && !acc_position.is_same(grad_position)) grad_position.copy_(acc_position);
  if (grad_type.defined() && !acc_type.is_same(grad_type)) grad_type.copy_(acc_type);
}

}  // namespace pixelbert
