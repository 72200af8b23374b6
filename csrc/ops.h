// The fused ops of pixelbert._C: pool_sample and embed_layernorm, forward and backward.
//
// The public entry points (declared first) check their arguments, then run the CPU (OpenMP)
// implementation, or the CUDA one for CUDA tensors when the extension is compiled with
// PIXELBERT_WITH_CUDA. The autograd wrappers live in pixelbert/ext_ops.py.
#pragma once
#include <torch/extension.h>

#include <tuple>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "index_view.h"

namespace pixelbert {

// ---- pool_sample -------------------------------------------------------------------------
// feat [B, C, H, W] (any strides; channels-last is read in place); index [N] int32/int64, flat
// positions b*Hp*Wp + r*Wp + c of the 2x2/stride-2 pooled grid; type_embedding [C] or None;
// out [M, C] (unit column stride) + out_index [N], or None: row i goes to out[out_index[i]].
// Returns (result, argmax): result is a new [N, C] tensor or `out`; argmax is a uint8 [N, C]
// tensor (0..3: the row-major position of the max inside the window) when save_argmax, else
// an undefined tensor.
std::tuple<torch::Tensor, torch::Tensor> pool_sample_forward(
    const torch::Tensor& feat, const torch::Tensor& index,
    const c10::optional<torch::Tensor>& type_embedding, const c10::optional<torch::Tensor>& out,
    const c10::optional<torch::Tensor>& out_index, bool save_argmax);

// grad: [N, C] (or [M, C] with out_index: row i's gradient is grad[out_index[i]]).
// Returns (grad_feat, grad_type): grad_feat is zeros of feat_sizes (channels-last when asked)
// but at each window's arg-max; grad_type [C] (type_dtype) is the column sum of the row
// gradients. Each is an undefined tensor (None) when not asked for.
std::tuple<torch::Tensor, torch::Tensor> pool_sample_backward(
    const torch::Tensor& grad, const torch::Tensor& index, const torch::Tensor& argmax,
    const c10::optional<torch::Tensor>& out_index, c10::IntArrayRef feat_sizes, bool channels_last,
    bool need_feat, bool need_type);

// ---- embed_layernorm ---------------------------------------------------------------------
// ids of any (common) shape [...] int32/int64; tables word [V, D], position [P, D], token_type
// [T, D] or None (then token_type_ids is ignored); weight, bias [D]; all tables one float dtype.
// Returns (result [..., D] or `out`, mean [N] fp32, rstd [N] fp32) over the N = ids.numel() rows.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> embed_layernorm_forward(
    const torch::Tensor& input_ids, const torch::Tensor& position_ids,
    const c10::optional<torch::Tensor>& token_type_ids, const torch::Tensor& word,
    const torch::Tensor& position, const c10::optional<torch::Tensor>& token_type,
    const torch::Tensor& weight, const torch::Tensor& bias, double eps,
    const c10::optional<torch::Tensor>& out, const c10::optional<torch::Tensor>& out_index);

// grad: [..., D] like the result, or [M, D] with out_index. Returns the gradients of (word,
// position, token_type, weight, bias), each in its tensor's dtype, or undefined (None) when its
// need_* flag is false.
std::vector<torch::Tensor> embed_layernorm_backward(
    const torch::Tensor& grad, const torch::Tensor& input_ids, const torch::Tensor& position_ids,
    const c10::optional<torch::Tensor>& token_type_ids, const torch::Tensor& word,
    const torch::Tensor& position, const c10::optional<torch::Tensor>& token_type,
    const torch::Tensor& weight, const torch::Tensor& bias, const torch::Tensor& mean,
    const torch::Tensor& rstd, const c10::optional<torch::Tensor>& out_index, bool need_word,
    bool need_position, bool need_type, bool need_weight, bool need_bias);

// ---- shared by the CPU and CUDA implementations --------------------------------------------

// Below this many elements of work (rows x channels) an op runs on one thread: ~100-300 us of
// single-thread work, where an OpenMP fork/join costs a few microseconds on an idle machine but
// milliseconds on a busy one (measured ~4-8 ms per parallel region, torch's own ops included,
// with 2 threads on a 2-core machine shared with a training run). The tiny training config's
// shapes (pool_sample 256 x 128, embed_layernorm 768 x 128) stay on one thread.
constexpr int64_t kMinParallelWork = 1 << 18;

// embed_layernorm's CPU row loops are built for the baseline x86-64 ISA (SSE2) and, where GCC/Clang
// can clone them, also for AVX2, picked at load time for the CPU at hand (they vectorise twice as
// wide: measured 1.4x to 1.9x at the tiny config's shapes). A cloned function must not throw (GCC
// makes it nothrow: an exception leaving it calls std::terminate).
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define PIXELBERT_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define PIXELBERT_CPU_CLONES
#endif
// Helpers of the cloned kernels: inlined, so that each clone has its own copy in its own ISA.
#if defined(__GNUC__)
#define PIXELBERT_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define PIXELBERT_ALWAYS_INLINE inline
#endif

inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// The dtypes the ext kernels compute in (accumulating in fp32).
inline bool is_fast_float(c10::ScalarType t) {
  return t == torch::kFloat32 || t == torch::kFloat16 || t == torch::kBFloat16;
}

// `t` checked as a 1-D int32/int64 tensor on `device` with `rows` entries (any count if rows < 0),
// returned contiguous; errors name `op` and `name` (csrc/out_buffer.cpp).
torch::Tensor checked_index(const char* op, const char* name, const torch::Tensor& t, int64_t rows,
                            const torch::Device& device);

// The optional output buffer of an op writing `rows` rows of width `dim`: `out` checked against
// `like`'s dtype and device (unit column stride), with `dst_index` set to the checked out_index;
// an undefined tensor when no buffer was given.
torch::Tensor checked_out_buffer(const char* op, const c10::optional<torch::Tensor>& out,
                                 const c10::optional<torch::Tensor>& out_index, int64_t rows,
                                 int64_t dim, const torch::Tensor& like, torch::Tensor& dst_index);

// A read-only view of a contiguous int32/int64 index tensor (undefined tensor: a null view).
inline IndexView index_view(const torch::Tensor& t) {
  if (!t.defined()) return IndexView{};
  return IndexView{t.data_ptr(), t.scalar_type() == torch::kInt64};
}

// Geometry of pool_sample's input, in elements (64-bit: offsets pass 2**31 on big maps).
struct PoolGeometry {
  int64_t channels, grid_h, grid_w, cells;  // cells = B * grid_h * grid_w
  int64_t stride_b, stride_c, stride_h, stride_w;

  // The (b, r, c) of flat cell `cell` as the element offset of its window's top-left corner.
  PIXELBERT_HOST_DEVICE int64_t window_offset(int64_t cell) const {
    const int64_t per_image = grid_h * grid_w;
    const int64_t b = cell / per_image;
    const int64_t rem = cell - b * per_image;
    const int64_t r = rem / grid_w;
    const int64_t c = rem - r * grid_w;
    return b * stride_b + 2 * r * stride_h + 2 * c * stride_w;
  }
};

// The arguments of embed_layernorm, validated: ids flattened and contiguous, tables with unit
// column stride, weight/bias as contiguous fp32.
struct EmbedArgs {
  torch::Tensor input_ids, position_ids, token_type_ids;  // [N]; token_type_ids undefined if no table
  torch::Tensor word, position, token_type;                // [*, D]; token_type may be undefined
  torch::Tensor weight, bias;                              // as given (any of the three dtypes)
  torch::Tensor weight_f32, bias_f32;                      // [D] fp32 contiguous
  int64_t rows, dim;
};

#ifdef PIXELBERT_WITH_CUDA
// CUDA implementations (csrc/*_cuda.cu); arguments already validated by the entry points.
void pool_sample_forward_cuda(const torch::Tensor& feat, const PoolGeometry& geom,
                              const torch::Tensor& index, const torch::Tensor& type_embedding,
                              torch::Tensor& out, const torch::Tensor& out_index,
                              torch::Tensor& argmax);
// geom: grad_feat's geometry (unused when grad_feat is undefined).
void pool_sample_backward_cuda(const torch::Tensor& grad, const torch::Tensor& index,
                               const torch::Tensor& argmax, const torch::Tensor& out_index,
                               const PoolGeometry& geom, torch::Tensor& grad_feat,
                               torch::Tensor& grad_type);
void embed_layernorm_forward_cuda(const EmbedArgs& args, double eps, torch::Tensor& out,
                                  const torch::Tensor& out_index, torch::Tensor& mean,
                                  torch::Tensor& rstd);
void embed_layernorm_backward_cuda(const EmbedArgs& args, const torch::Tensor& grad,
                                   const torch::Tensor& out_index, const torch::Tensor& mean,
                                   const torch::Tensor& rstd, torch::Tensor& grad_word,
                                   torch::Tensor& grad_position, torch::Tensor& grad_type,
                                   torch::Tensor& grad_weight, torch::Tensor& grad_bias);
#endif

}  // namespace pixelbert
