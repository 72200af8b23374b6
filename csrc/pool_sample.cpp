// pool_sample: rows `index` of the 2x2/stride-2 max-pooled feature map (+ a type embedding),
// computed in one pass that reads only the sampled cells' windows; the pooled map is never
// materialised, forward or backward.
//
// Forward, per sampled cell: read the cell's 2x2 window for all channels (contiguous along C
// for channels-last input, strided for NCHW: the strides are used as they are, never copied),
// write max + type embedding into the output row (or out[out_index[i]]) and, when a gradient is
// wanted, the window position of the max (uint8 0..3) for the backward.
// Ties and NaN follow torch.max_pool2d (its CPU and CUDA kernels alike): the window is scanned
// row-major and a value replaces the running max when `value > max || isnan(value)`, so the
// first of equal maxima wins and the last NaN wins.
// Backward: zeros in feat's memory format, the row gradient copied to each arg-max; the type
// embedding's gradient is the column sum of the row gradients, in fp32 per-thread partials.
#include "ops.h"

#include <cmath>
#include <vector>

namespace pixelbert {
namespace {

PoolGeometry geometry_of(const torch::Tensor& feat) {
  PoolGeometry g;
  g.channels = feat.size(1);
  g.grid_h = feat.size(2) / 2;
  g.grid_w = feat.size(3) / 2;
  g.cells = feat.size(0) * g.grid_h * g.grid_w;
  g.stride_b = feat.stride(0);
  g.stride_c = feat.stride(1);
  g.stride_h = feat.stride(2);
  g.stride_w = feat.stride(3);
  return g;
}

// One output row: max over the 2x2 window of every channel (+ type), and its arg-max.
template <bool kUnitChannelStride, typename scalar_t>
PIXELBERT_ALWAYS_INLINE void pool_row(const scalar_t* __restrict__ window, int64_t channels, int64_t sc,
                     int64_t sh, int64_t sw, const float* __restrict__ type,
                     scalar_t* __restrict__ dst, uint8_t* __restrict__ argmax) {
  for (int64_t ch = 0; ch < channels; ++ch) {
    const scalar_t* q = window + (kUnitChannelStride ? ch : ch * sc);
    float best = static_cast<float>(q[0]);
    uint8_t k = 0;
    const float v1 = static_cast<float>(q[sw]);
    const float v2 = static_cast<float>(q[sh]);
    const float v3 = static_cast<float>(q[sh + sw]);
    // torch.max_pool2d's rule: strictly greater, or NaN (scan order 0, 1, 2, 3). Branch-free.
    const bool t1 = v1 > best || std::isnan(v1);
    best = t1 ? v1 : best;
    k = t1 ? 1 : k;
    const bool t2 = v2 > best || std::isnan(v2);
    best = t2 ? v2 : best;
    k = t2 ? 2 : k;
    const bool t3 = v3 > best || std::isnan(v3);
    best = t3 ? v3 : best;
    k = t3 ? 3 : k;
    dst[ch] = static_cast<scalar_t>(type != nullptr ? best + type[ch] : best);
    if (argmax != nullptr) argmax[ch] = k;
  }
}

template <typename scalar_t>
void forward_cpu(const torch::Tensor& feat, const PoolGeometry& g, const torch::Tensor& index,
                 const torch::Tensor& type_f32, torch::Tensor& out, const torch::Tensor& out_index,
                 torch::Tensor& argmax) {
  const scalar_t* src = feat.data_ptr<scalar_t>();
  const IndexView idx = index_view(index);
  const IndexView dst_idx = index_view(out_index);
  const float* type = type_f32.defined() ? type_f32.data_ptr<float>() : nullptr;
  scalar_t* dst = out.data_ptr<scalar_t>();
  const int64_t out_stride = out.stride(0), out_rows = out.size(0);
  uint8_t* am = argmax.defined() ? argmax.data_ptr<uint8_t>() : nullptr;
  const int64_t rows = index.size(0), channels = g.channels;
  const bool unit = g.stride_c == 1;
  bool bad = false;

#pragma omp parallel for schedule(static) if (rows * channels >= kMinParallelWork) reduction(|| : bad)
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t cell = idx[i];
    const int64_t row = dst_idx.present() ? dst_idx[i] : i;
    if (cell < 0 || cell >= g.cells || row < 0 || row >= out_rows) {
      bad = true;
      continue;
    }
    const scalar_t* window = src + g.window_offset(cell);
    scalar_t* d = dst + row * out_stride;
    uint8_t* a = am != nullptr ? am + i * channels : nullptr;
    if (unit) {
      pool_row<true>(window, channels, 1, g.stride_h, g.stride_w, type, d, a);
    } else {
      pool_row<false>(window, channels, g.stride_c, g.stride_h, g.stride_w, type, d, a);
    }
  }
  TORCH_CHECK(!bad, "pool_sample: index or out_index holds a value out of range (cells: ",
              g.cells, ", out rows: ", out_rows, "); PIXELBERT_DEBUG=1 reports which");
}

template <typename scalar_t>
void backward_cpu(const torch::Tensor& grad, const torch::Tensor& index,
                  const torch::Tensor& argmax, const torch::Tensor& out_index,
                  torch::Tensor& grad_feat, torch::Tensor& grad_type) {
  const int64_t rows = index.size(0), channels = grad.size(1);
  const scalar_t* g = grad.data_ptr<scalar_t>();
  const int64_t grad_stride = grad.stride(0), grad_rows = grad.size(0);
  const IndexView idx = index_view(index);
  const IndexView src_idx = index_view(out_index);
  const uint8_t* am = grad_feat.defined() ? argmax.data_ptr<uint8_t>() : nullptr;
  scalar_t* gf = grad_feat.defined() ? grad_feat.data_ptr<scalar_t>() : nullptr;
  PoolGeometry geom{};
  if (gf != nullptr) geom = geometry_of(grad_feat);
  const int64_t cells = gf != nullptr ? geom.cells : 0;

  const bool parallel = rows * channels >= kMinParallelWork && max_threads() > 1;
  const int threads = parallel ? max_threads() : 1;
  // Per-thread fp32 column sums for the type embedding: no atomics, reduced below.
  std::vector<float> partial(grad_type.defined() ? static_cast<size_t>(threads) * channels : 0, 0.f);
  bool bad = false;

#pragma omp parallel if (parallel) num_threads(threads) reduction(|| : bad)
  {
    float* part = partial.empty() ? nullptr : partial.data() + thread_id() * channels;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t row = src_idx.present() ? src_idx[i] : i;
      if (row < 0 || row >= grad_rows) {
        bad = true;
        continue;
      }
      const scalar_t* gr = g + row * grad_stride;
      if (gf != nullptr) {
        const int64_t cell = idx[i];
        if (cell < 0 || cell >= cells) {
          bad = true;
          continue;
        }
        scalar_t* window = gf + geom.window_offset(cell);
        const uint8_t* a = am + i * channels;
        for (int64_t ch = 0; ch < channels; ++ch) {
          const int k = a[ch];
          window[ch * geom.stride_c + (k >> 1) * geom.stride_h + (k & 1) * geom.stride_w] = gr[ch];
        }
      }
      if (part != nullptr) {
        for (int64_t ch = 0; ch < channels; ++ch) part[ch] += static_cast<float>(gr[ch]);
      }
    }
  }
  TORCH_CHECK(!bad, "pool_sample backward: index or out_index holds a value out of range");
  if (grad_type.defined()) {
    auto sum = torch::zeros({channels}, grad.options().dtype(torch::kFloat32));
    float* s = sum.data_ptr<float>();
    for (int t = 0; t < threads; ++t) {
      const float* part = partial.data() + static_cast<size_t>(t) * channels;
      for (int64_t ch = 0; ch < channels; ++ch) s[ch] += part[ch];
    }
    grad_type.copy_(sum);
  }
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor> pool_sample_forward(
    const torch::Tensor& feat, const torch::Tensor& index,
    const c10::optional<torch::Tensor>& type_embedding, const c10::optional<torch::Tensor>& out,
    const c10::optional<torch::Tensor>& out_index, bool save_argmax) {
  TORCH_CHECK(feat.dim() == 4, "pool_sample: feat must be [B, C, H, W], got ", feat.sizes());
  TORCH_CHECK(is_fast_float(feat.scalar_type()),
              "pool_sample: feat must be float32, float16 or bfloat16, got ", feat.scalar_type());
  TORCH_CHECK(feat.size(2) >= 2 && feat.size(3) >= 2, "pool_sample: feat of ", feat.size(2), "x",
              feat.size(3), " has no 2x2 window");
  const auto device = feat.device();
  TORCH_CHECK(device.is_cpu() || device.is_cuda(), "pool_sample: feat must be a CPU or CUDA tensor, got ",
              device);
  checked_index("pool_sample", "index", index, -1, device);
  const int64_t rows = index.size(0), channels = feat.size(1);

  torch::Tensor type;
  if (type_embedding.has_value() && type_embedding->defined()) {
    type = *type_embedding;
    TORCH_CHECK(type.dim() == 1 && type.size(0) == channels, "pool_sample: type_embedding must be [",
                channels, "], got ", type.sizes());
    TORCH_CHECK(type.device() == device, "pool_sample: type_embedding is on ", type.device(),
                ", expected ", device);
    TORCH_CHECK(type.scalar_type() == feat.scalar_type(), "pool_sample: type_embedding is ",
                type.scalar_type(), ", feat ", feat.scalar_type());
  }
  torch::Tensor dst_index;
  torch::Tensor result = checked_out_buffer("pool_sample", out, out_index, rows, channels, feat, dst_index);
  if (!result.defined()) result = torch::empty({rows, channels}, feat.options());
  torch::Tensor argmax;
  if (save_argmax) argmax = torch::empty({rows, channels}, feat.options().dtype(torch::kUInt8));
  if (rows == 0 || channels == 0) return {result, argmax};

  const auto idx = index.contiguous();
  const PoolGeometry geom = geometry_of(feat);
  if (device.is_cuda()) {
#ifdef PIXELBERT_WITH_CUDA
    pool_sample_forward_cuda(feat, geom, idx, type.defined() ? type.contiguous() : type, result,
                             dst_index, argmax);
#else
    TORCH_CHECK(false, "pool_sample: pixelbert._C was built without CUDA; CUDA tensors need the "
                "triton or reference backend");
#endif
  } else {
    const auto type_f32 = type.defined() ? type.to(torch::kFloat32).contiguous() : type;
    AT_DISPATCH_FLOATING_TYPES_AND2(torch::kHalf, torch::kBFloat16, feat.scalar_type(),
                                    "pool_sample_forward", [&] {
      forward_cpu<scalar_t>(feat, geom, idx, type_f32, result, dst_index, argmax);
    });
  }
  return {result, argmax};
}

std::tuple<torch::Tensor, torch::Tensor> pool_sample_backward(
    const torch::Tensor& grad_in, const torch::Tensor& index, const torch::Tensor& argmax,
    const c10::optional<torch::Tensor>& out_index, c10::IntArrayRef feat_sizes, bool channels_last,
    bool need_feat, bool need_type) {
  TORCH_CHECK(feat_sizes.size() == 4, "pool_sample backward: feat_sizes must have 4 entries");
  TORCH_CHECK(feat_sizes[2] >= 2 && feat_sizes[3] >= 2, "pool_sample backward: feat has no 2x2 window");
  const int64_t channels = feat_sizes[1];
  const auto device = grad_in.device();
  TORCH_CHECK(device.is_cpu() || device.is_cuda(), "pool_sample backward: grad must be a CPU or CUDA tensor");
  TORCH_CHECK(is_fast_float(grad_in.scalar_type()),
              "pool_sample backward: grad must be float32, float16 or bfloat16, got ", grad_in.scalar_type());
  TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(1) == channels,
              "pool_sample backward: grad must be [rows, ", channels, "], got ", grad_in.sizes());
  checked_index("pool_sample", "index", index, -1, device);
  const int64_t rows = index.size(0);
  const bool has_out_index = out_index.has_value() && out_index->defined();
  torch::Tensor src_index;
  if (has_out_index) {
    src_index = checked_index("pool_sample", "out_index", *out_index, rows, device);
  } else {
    TORCH_CHECK(grad_in.size(0) == rows, "pool_sample backward: grad has ", grad_in.size(0),
                " rows, index ", rows);
  }
  if (need_feat) {
    TORCH_CHECK(argmax.defined() && argmax.scalar_type() == torch::kUInt8 && argmax.dim() == 2 &&
                    argmax.size(0) == rows && argmax.size(1) == channels && argmax.is_contiguous() &&
                    argmax.device() == device,
                "pool_sample backward: argmax must be a contiguous uint8 [", rows, ", ", channels,
                "] tensor (saved by the forward with save_argmax=True)");
  }
  // Rows of grad are read with their row stride; a column stride other than 1 is copied once.
  const auto grad = grad_in.stride(1) == 1 ? grad_in : grad_in.contiguous();

  torch::Tensor grad_feat, grad_type;
  if (need_feat) {
    grad_feat = torch::zeros(feat_sizes, grad.options().memory_format(
        channels_last ? torch::MemoryFormat::ChannelsLast : torch::MemoryFormat::Contiguous));
  }
  if (need_type) grad_type = torch::zeros({channels}, grad.options());
  if (rows == 0 || channels == 0 || (!need_feat && !need_type)) return {grad_feat, grad_type};

  const auto idx = index.contiguous();
  if (device.is_cuda()) {
#ifdef PIXELBERT_WITH_CUDA
    const PoolGeometry geom = grad_feat.defined() ? geometry_of(grad_feat) : PoolGeometry{};
    pool_sample_backward_cuda(grad, idx, argmax, src_index, geom, grad_feat, grad_type);
#else
    TORCH_CHECK(false, "pool_sample: pixelbert._C was built without CUDA");
#endif
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(torch::kHalf, torch::kBFloat16, grad.scalar_type(),
                                    "pool_sample_backward", [&] {
      backward_cpu<scalar_t>(grad, idx, argmax, src_index, grad_feat, grad_type);
    });
  }
  return {grad_feat, grad_type};
}

}  // namespace pixelbert
