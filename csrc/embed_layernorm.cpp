// embed_layernorm: layer_norm(word[ids] + position[position_ids] (+ type[token_type_ids])),
// one pass per row: three gathers, the sum, mean and variance in fp32, normalise, affine, store
// in the tables' dtype; mean and rstd (fp32) are kept for the backward.
//
// Backward (CPU):
//   1. over rows (OpenMP): recompute the row from the tables and the saved mean/rstd, then
//      dX = rstd * (dy*w - mean(dy*w) - xhat * mean(dy*w*xhat)) into an fp32 buffer (a chunk
//      of rows at a time, steps 1 and 2 alternating; below the parallel threshold, on one
//      thread, straight into the accumulators of step 2);
//      dweight += dy*xhat and dbias += dy in per-thread fp32 partial buffers (reduced after).
//   2. the table gradients, race-free and balanced however the ids repeat: the fp32 accumulators
//      are the zeroed gradient itself for fp32 tables, or compact fp32 rows (one per distinct id,
//      mapped in one serial O(N) pass that also checks the ids) for half tables. The threads
//      split the D columns into blocks: a thread adds column block [d0, d1) of every row's dX
//      into the accumulators. No two threads touch the same element, no atomics, and a hot id
//      (90% of the rows on one word, two type ids for everything) costs the same as spread ids,
//      where a split by id would put the hot id's rows on one thread.
//   3. half tables: the compact fp32 rows are cast into the zeroed gradient.
#include "ops.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

namespace pixelbert {
namespace {

torch::Tensor unit_column_stride(const torch::Tensor& t) {
  return t.stride(1) == 1 ? t : t.contiguous();
}

torch::Tensor flat_ids(const char* name, const torch::Tensor& ids, const torch::Tensor& like,
                       const torch::Device& device) {
  TORCH_CHECK(ids.scalar_type() == torch::kInt32 || ids.scalar_type() == torch::kInt64,
              "embed_layernorm: ", name, " must be int32 or int64, got ", ids.scalar_type());
  TORCH_CHECK(ids.device() == device, "embed_layernorm: ", name, " is on ", ids.device(),
              ", expected ", device);
  TORCH_CHECK(ids.sizes() == like.sizes(), "embed_layernorm: ", name, " has shape ", ids.sizes(),
              ", input_ids ", like.sizes());
  return ids.reshape({-1}).contiguous();
}

void check_table(const char* name, const torch::Tensor& table, const torch::Tensor& word) {
  TORCH_CHECK(table.dim() == 2 && table.size(1) == word.size(1), "embed_layernorm: ", name,
              " must be [*, ", word.size(1), "], got ", table.sizes());
  TORCH_CHECK(table.device() == word.device(), "embed_layernorm: ", name, " is on ",
              table.device(), ", expected ", word.device());
  TORCH_CHECK(table.scalar_type() == word.scalar_type(), "embed_layernorm: ", name, " is ",
              table.scalar_type(), ", word_embeddings ", word.scalar_type());
}

void check_vector(const char* name, const torch::Tensor& vec, const torch::Tensor& word) {
  TORCH_CHECK(vec.dim() == 1 && vec.size(0) == word.size(1), "embed_layernorm: ", name,
              " must be [", word.size(1), "], got ", vec.sizes());
  TORCH_CHECK(vec.device() == word.device(), "embed_layernorm: ", name, " is on ", vec.device(),
              ", expected ", word.device());
  TORCH_CHECK(is_fast_float(vec.scalar_type()), "embed_layernorm: ", name,
              " must be float32, float16 or bfloat16, got ", vec.scalar_type());
}

// Validates every argument shared by the forward and the backward.
EmbedArgs make_args(const torch::Tensor& input_ids, const torch::Tensor& position_ids,
                    const c10::optional<torch::Tensor>& token_type_ids, const torch::Tensor& word,
                    const torch::Tensor& position, const c10::optional<torch::Tensor>& token_type,
                    const torch::Tensor& weight, const torch::Tensor& bias) {
  TORCH_CHECK(word.dim() == 2, "embed_layernorm: word_embeddings must be [V, D], got ", word.sizes());
  TORCH_CHECK(is_fast_float(word.scalar_type()),
              "embed_layernorm: tables must be float32, float16 or bfloat16, got ", word.scalar_type());
  const auto device = word.device();
  TORCH_CHECK(device.is_cpu() || device.is_cuda(),
              "embed_layernorm: tensors must be on the CPU or a CUDA device, got ", device);
  EmbedArgs a;
  a.dim = word.size(1);
  check_table("position_embeddings", position, word);
  a.word = unit_column_stride(word);
  a.position = unit_column_stride(position);
  if (token_type.has_value() && token_type->defined()) {
    check_table("token_type_embeddings", *token_type, word);
    TORCH_CHECK(token_type_ids.has_value() && token_type_ids->defined(),
                "embed_layernorm: token_type_embeddings given without token_type_ids");
    a.token_type = unit_column_stride(*token_type);
  }
  check_vector("weight", weight, word);
  check_vector("bias", bias, word);
  a.weight = weight;
  a.bias = bias;
  a.weight_f32 = weight.to(torch::kFloat32).contiguous();
  a.bias_f32 = bias.to(torch::kFloat32).contiguous();
  a.input_ids = flat_ids("input_ids", input_ids, input_ids, device);
  a.position_ids = flat_ids("position_ids", position_ids, input_ids, device);
  if (a.token_type.defined()) {
    a.token_type_ids = flat_ids("token_type_ids", *token_type_ids, input_ids, device);
  }
  a.rows = a.input_ids.numel();
  return a;
}

// sum over d < n of f(d), in kLanes independent fp32 accumulators: a plain `sum += f(d)` is one
// serial chain of dependent adds (the compiler may not reorder float adds), several times slower
// than the rest of a row's work; independent lanes vectorise and pipeline.
template <typename F>
PIXELBERT_ALWAYS_INLINE float lane_sum(int64_t n, F f) {
  constexpr int kLanes = 16;
  float acc[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += f(d + l);
  }
  float tail = 0.f;
  for (; d < n; ++d) tail += f(d);
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) acc[l] += acc[l + width];
  }
  return acc[0] + tail;
}

// Pointers of one row's three table rows, or false when an id is out of range.
template <typename scalar_t>
struct Tables {
  const scalar_t *word, *position, *type;
  int64_t word_stride, position_stride, type_stride, words, positions, types;
  IndexView word_ids, position_ids, type_ids;

  explicit Tables(const EmbedArgs& a)
      : word(a.word.data_ptr<scalar_t>()), position(a.position.data_ptr<scalar_t>()),
        type(a.token_type.defined() ? a.token_type.data_ptr<scalar_t>() : nullptr),
        word_stride(a.word.stride(0)), position_stride(a.position.stride(0)),
        type_stride(a.token_type.defined() ? a.token_type.stride(0) : 0),
        words(a.word.size(0)), positions(a.position.size(0)),
        types(a.token_type.defined() ? a.token_type.size(0) : 0),
        word_ids(index_view(a.input_ids)), position_ids(index_view(a.position_ids)),
        type_ids(index_view(a.token_type_ids)) {}

  // x[d] = word[id][d] + position[pid][d] (+ type[tid][d]) in fp32.
  PIXELBERT_ALWAYS_INLINE bool gather(int64_t i, int64_t dim, float* __restrict__ x) const {
    const int64_t w = word_ids[i], p = position_ids[i];
    const int64_t t = type != nullptr ? type_ids[i] : 0;
    if (w < 0 || w >= words || p < 0 || p >= positions || (type != nullptr && (t < 0 || t >= types))) {
      return false;
    }
    const scalar_t* __restrict__ wr = word + w * word_stride;
    const scalar_t* __restrict__ pr = position + p * position_stride;
    if (type != nullptr) {
      const scalar_t* __restrict__ tr = type + t * type_stride;
      for (int64_t d = 0; d < dim; ++d) {
        x[d] = static_cast<float>(wr[d]) + static_cast<float>(pr[d]) + static_cast<float>(tr[d]);
      }
    } else {
      for (int64_t d = 0; d < dim; ++d) x[d] = static_cast<float>(wr[d]) + static_cast<float>(pr[d]);
    }
    return true;
  }
};

// ---- the row loops -------------------------------------------------------------------------
// Built once per ISA (PIXELBERT_CPU_CLONES), they take raw pointers and preallocated buffers and
// must not throw: GCC makes a target_clones function nothrow, so an exception leaving one would
// call std::terminate. They return false on an out-of-range id; their callers raise the error.

template <typename scalar_t>
struct ForwardLoop {
  Tables<scalar_t> tables;
  const float *weight, *bias;
  scalar_t* out;
  int64_t out_stride, out_rows;
  IndexView out_index;
  float *mean, *rstd;
  float eps;
  int64_t rows, dim;
  int threads;
  float* scratch;  // [threads, dim]
};

template <typename scalar_t>
PIXELBERT_CPU_CLONES bool forward_rows(const ForwardLoop<scalar_t>& p) noexcept {
  const int64_t dim = p.dim;
  bool bad = false;
#pragma omp parallel num_threads(p.threads) if (p.threads > 1) reduction(|| : bad)
  {
    float* x = p.scratch + static_cast<size_t>(thread_id()) * dim;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < p.rows; ++i) {
      const int64_t row = p.out_index.present() ? p.out_index[i] : i;
      if (row < 0 || row >= p.out_rows || !p.tables.gather(i, dim, x)) {
        bad = true;
        continue;
      }
      const float mu = lane_sum(dim, [&](int64_t d) { return x[d]; }) / dim;
      const float var = lane_sum(dim, [&](int64_t d) { return (x[d] - mu) * (x[d] - mu); }) / dim;
      const float rs = 1.f / std::sqrt(var + p.eps);
      scalar_t* y = p.out + row * p.out_stride;
      for (int64_t d = 0; d < dim; ++d) {
        y[d] = static_cast<scalar_t>((x[d] - mu) * rs * p.weight[d] + p.bias[d]);
      }
      p.mean[i] = mu;
      p.rstd[i] = rs;
    }
  }
  return !bad;
}

PIXELBERT_ALWAYS_INLINE void add_to(float* __restrict__ dst, const float* __restrict__ src, int64_t len) {
  for (int64_t d = 0; d < len; ++d) dst[d] += src[d];
}

// Where one table's gradient accumulates, in fp32: an fp32 table's straight into its (zeroed,
// contiguous) gradient tensor; a half table's into compact fp32 rows, one per distinct id, cast
// into its gradient at the end. Row i of the batch adds into acc + slot[i] * D.
struct TableGrad {
  float* acc = nullptr;
  std::vector<int64_t> slot;
  std::vector<int64_t> ids;     // compact only: accumulator row -> table row
  std::vector<float> storage;   // compact only: the accumulators
};

// One serial O(N) pass: also checks every id against the table.
TableGrad table_grad(const char* name, IndexView ids, int64_t rows, torch::Tensor& grad, int64_t dim) {
  TableGrad t;
  const int64_t table_rows = grad.size(0);
  t.slot.resize(rows);
  const bool direct = grad.scalar_type() == torch::kFloat32;
  std::vector<int64_t> map(direct ? 0 : table_rows, -1);
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t id = ids[i];
    TORCH_CHECK(id >= 0 && id < table_rows, "embed_layernorm backward: ", name, " holds ", id,
                ", outside [0, ", table_rows, ")");
    if (direct) {
      t.slot[i] = id;
      continue;
    }
    if (map[id] < 0) {
      map[id] = static_cast<int64_t>(t.ids.size());
      t.ids.push_back(id);
    }
    t.slot[i] = map[id];
  }
  if (direct) {
    t.acc = grad.data_ptr<float>();
  } else {
    t.storage.assign(t.ids.size() * dim, 0.f);
    t.acc = t.storage.data();
  }
  return t;
}

// Adds columns [d0, d0 + len) of row i's dX into row i's accumulator row of each table given.
// Forced inline: it must be compiled in its caller's ISA clone (a call from an AVX2 loop into
// an SSE copy measured 3x slower: the 32-byte stores of dX do not forward to 16-byte loads).
PIXELBERT_ALWAYS_INLINE void scatter_row(const TableGrad* const* tables, int64_t i, const float* src,
                                         int64_t d0, int64_t len, int64_t dim) {
  for (int k = 0; k < 3; ++k) {
    if (tables[k] != nullptr) add_to(tables[k]->acc + tables[k]->slot[i] * dim + d0, src, len);
  }
}

template <typename scalar_t>
struct BackwardLoop {
  Tables<scalar_t> tables;
  const float *weight, *mean, *rstd;
  const scalar_t* grad;
  int64_t grad_stride, grad_rows;
  IndexView grad_index;  // row i's gradient is grad[grad_index[i]] (out buffer), else grad[i]
  int64_t rows, dim;
  int threads;
  float* scratch;                  // [threads, 2 * dim]
  float *partial_w, *partial_b;    // [threads, dim] each, or null when not asked for
  float* dx;                       // [chunk_rows, dim] with several threads, else null
  int64_t chunk_rows;              // rows per pass of steps 1 and 2 (bounds the dX buffer)
  const TableGrad* scatter_to[3];  // word, position, type; null when not asked for
  bool need_tables;
};

template <typename scalar_t>
PIXELBERT_CPU_CLONES bool backward_rows(const BackwardLoop<scalar_t>& p) noexcept {
  const int64_t dim = p.dim;
  bool bad = false;
  for (int64_t r0 = 0; r0 < p.rows && !bad; r0 += p.chunk_rows) {
    const int64_t r1 = std::min(p.rows, r0 + p.chunk_rows);
    // 1. dX per row (into the buffer, or on one thread straight into the accumulators), and
    //    the per-thread partial sums of dweight / dbias.
#pragma omp parallel num_threads(p.threads) if (p.threads > 1) reduction(|| : bad)
    {
      const int t = thread_id();
      float* x = p.scratch + static_cast<size_t>(t) * 2 * dim;
      float* row_dx = x + dim;
      float* pw = p.partial_w != nullptr ? p.partial_w + static_cast<size_t>(t) * dim : nullptr;
      float* pb = p.partial_b != nullptr ? p.partial_b + static_cast<size_t>(t) * dim : nullptr;
#pragma omp for schedule(static)
      for (int64_t i = r0; i < r1; ++i) {
        const int64_t row = p.grad_index.present() ? p.grad_index[i] : i;
        if (row < 0 || row >= p.grad_rows || !p.tables.gather(i, dim, x)) {
          bad = true;
          continue;
        }
        const scalar_t* dy = p.grad + row * p.grad_stride;
        const float* w = p.weight;
        const float mu = p.mean[i], rs = p.rstd[i];
        for (int64_t d = 0; d < dim; ++d) x[d] = (x[d] - mu) * rs;  // xhat
        const float s1 = lane_sum(dim, [&](int64_t d) { return static_cast<float>(dy[d]) * w[d]; });
        const float s2 = lane_sum(dim, [&](int64_t d) { return static_cast<float>(dy[d]) * w[d] * x[d]; });
        if (pw != nullptr) {
          for (int64_t d = 0; d < dim; ++d) pw[d] += static_cast<float>(dy[d]) * x[d];
        }
        if (pb != nullptr) {
          for (int64_t d = 0; d < dim; ++d) pb[d] += static_cast<float>(dy[d]);
        }
        if (p.need_tables) {
          const float c1 = s1 / dim, c2 = s2 / dim;
          float* out = p.dx != nullptr ? p.dx + (i - r0) * dim : row_dx;
          for (int64_t d = 0; d < dim; ++d) out[d] = rs * (static_cast<float>(dy[d]) * w[d] - c1 - x[d] * c2);
          if (p.dx == nullptr) scatter_row(p.scatter_to, i, out, 0, dim, dim);
        }
      }
    }
    // 2. scatter the chunk's dX into the accumulators, the threads split by column blocks
    //    (multiples of 16 floats, a cache line, so threads seldom share a line).
    if (p.dx != nullptr && !bad) {
      const int64_t per_thread = (dim + p.threads - 1) / p.threads;
      const int64_t block = std::max<int64_t>(16, (per_thread + 15) / 16 * 16);
      const int64_t blocks = (dim + block - 1) / block;
#pragma omp parallel for schedule(static) num_threads(p.threads) if (blocks > 1)
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t d0 = blk * block, len = std::min(block, dim - d0);
        for (int64_t i = r0; i < r1; ++i) {
          scatter_row(p.scatter_to, i, p.dx + (i - r0) * dim + d0, d0, len, dim);
        }
      }
    }
  }
  return !bad;
}

// ---- the CPU implementations: checks, buffers, then the row loops ----------------------------

// Threads for `work` elements: one below kMinParallelWork (a fork/join would cost more).
int threads_for(int64_t work) {
  return work >= kMinParallelWork ? std::max(1, max_threads()) : 1;
}

template <typename scalar_t>
void forward_cpu(const EmbedArgs& a, double eps, torch::Tensor& out, const torch::Tensor& out_index,
                 torch::Tensor& mean, torch::Tensor& rstd) {
  const int threads = threads_for(a.rows * a.dim);
  std::vector<float> scratch(static_cast<size_t>(threads) * a.dim);
  const ForwardLoop<scalar_t> loop{Tables<scalar_t>(a), a.weight_f32.data_ptr<float>(),
                                   a.bias_f32.data_ptr<float>(), out.data_ptr<scalar_t>(),
                                   out.stride(0), out.size(0), index_view(out_index),
                                   mean.data_ptr<float>(), rstd.data_ptr<float>(),
                                   static_cast<float>(eps), a.rows, a.dim, threads, scratch.data()};
  TORCH_CHECK(forward_rows(loop), "embed_layernorm: an id or out_index value is out of range of its "
              "table (PIXELBERT_DEBUG=1 reports which)");
}

template <typename scalar_t>
void write_table_grad(const TableGrad& t, int64_t dim, torch::Tensor& grad, int threads) {
  if (t.storage.empty()) return;  // accumulated in place
  scalar_t* g = grad.data_ptr<scalar_t>();
  const int64_t unique = static_cast<int64_t>(t.ids.size());
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t u = 0; u < unique; ++u) {
    scalar_t* dst = g + t.ids[u] * dim;
    const float* src = t.storage.data() + u * dim;
    for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<scalar_t>(src[d]);
  }
}

// Sums per-thread fp32 partials [threads, dim] into `out` (cast to its dtype).
void reduce_partials(const std::vector<float>& partial, int threads, int64_t dim, torch::Tensor& out) {
  auto sum = torch::zeros({dim}, torch::TensorOptions().dtype(torch::kFloat32));
  float* s = sum.data_ptr<float>();
  for (int t = 0; t < threads; ++t) {
    const float* p = partial.data() + static_cast<size_t>(t) * dim;
    for (int64_t d = 0; d < dim; ++d) s[d] += p[d];
  }
  out.copy_(sum);
}

template <typename scalar_t>
void backward_cpu(const EmbedArgs& a, const torch::Tensor& grad, const torch::Tensor& out_index,
                  const torch::Tensor& mean, const torch::Tensor& rstd, torch::Tensor& grad_word,
                  torch::Tensor& grad_position, torch::Tensor& grad_type, torch::Tensor& grad_weight,
                  torch::Tensor& grad_bias) {
  const int64_t rows = a.rows, dim = a.dim;
  const int threads = threads_for(rows * dim);
  const Tables<scalar_t> tables(a);
  // 0. where each table's gradient accumulates (serial; checks the ids).
  TableGrad word, position, type;
  if (grad_word.defined()) word = table_grad("input_ids", tables.word_ids, rows, grad_word, dim);
  if (grad_position.defined()) {
    position = table_grad("position_ids", tables.position_ids, rows, grad_position, dim);
  }
  if (grad_type.defined()) type = table_grad("token_type_ids", tables.type_ids, rows, grad_type, dim);
  const bool need_tables = grad_word.defined() || grad_position.defined() || grad_type.defined();

  std::vector<float> scratch(static_cast<size_t>(threads) * 2 * dim);
  std::vector<float> partial_w(grad_weight.defined() ? static_cast<size_t>(threads) * dim : 0, 0.f);
  std::vector<float> partial_b(grad_bias.defined() ? static_cast<size_t>(threads) * dim : 0, 0.f);
  // With several threads dX goes through an (uninitialised) fp32 buffer of up to kChunkFloats,
  // a chunk of rows at a time (about 8 MB: it stays in cache between steps 1 and 2).
  constexpr int64_t kChunkFloats = int64_t{1} << 21;
  const bool buffered = need_tables && threads > 1;
  const int64_t chunk_rows = buffered ? std::min(rows, std::max<int64_t>(256, kChunkFloats / dim)) : rows;
  std::unique_ptr<float[]> dx(buffered ? new float[static_cast<size_t>(chunk_rows) * dim] : nullptr);
  const BackwardLoop<scalar_t> loop{
      tables, a.weight_f32.data_ptr<float>(), mean.data_ptr<float>(), rstd.data_ptr<float>(),
      grad.data_ptr<scalar_t>(), grad.stride(0), grad.size(0), index_view(out_index), rows, dim,
      threads, scratch.data(), partial_w.empty() ? nullptr : partial_w.data(),
      partial_b.empty() ? nullptr : partial_b.data(), dx.get(), chunk_rows,
      {grad_word.defined() ? &word : nullptr, grad_position.defined() ? &position : nullptr,
       grad_type.defined() ? &type : nullptr},
      need_tables};
  TORCH_CHECK(backward_rows(loop), "embed_layernorm backward: an id or out_index value is out of range");

  // 3. half tables: cast the compact fp32 rows into the zeroed gradients.
  if (grad_word.defined()) write_table_grad<scalar_t>(word, dim, grad_word, threads);
  if (grad_position.defined()) write_table_grad<scalar_t>(position, dim, grad_position, threads);
  if (grad_type.defined()) write_table_grad<scalar_t>(type, dim, grad_type, threads);
  if (grad_weight.defined()) reduce_partials(partial_w, threads, dim, grad_weight);
  if (grad_bias.defined()) reduce_partials(partial_b, threads, dim, grad_bias);
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> embed_layernorm_forward(
    const torch::Tensor& input_ids, const torch::Tensor& position_ids,
    const c10::optional<torch::Tensor>& token_type_ids, const torch::Tensor& word,
    const torch::Tensor& position, const c10::optional<torch::Tensor>& token_type,
    const torch::Tensor& weight, const torch::Tensor& bias, double eps,
    const c10::optional<torch::Tensor>& out, const c10::optional<torch::Tensor>& out_index) {
  const EmbedArgs a = make_args(input_ids, position_ids, token_type_ids, word, position, token_type,
                                weight, bias);
  TORCH_CHECK(eps >= 0, "embed_layernorm: eps must be >= 0, got ", eps);
  const auto device = word.device();
  torch::Tensor dst_index;
  torch::Tensor result = checked_out_buffer("embed_layernorm", out, out_index, a.rows, a.dim, word, dst_index);
  const bool has_out = result.defined();
  if (!has_out) {
    auto shape = input_ids.sizes().vec();
    shape.push_back(a.dim);
    result = torch::empty(shape, word.options());
  }
  auto stats = word.options().dtype(torch::kFloat32);
  auto mean = torch::empty({a.rows}, stats);
  auto rstd = torch::empty({a.rows}, stats);
  if (a.rows == 0 || a.dim == 0) return {result, mean, rstd};

  // Without an out buffer, the result is a fresh contiguous [..., D]: viewed as [N, D].
  torch::Tensor rows_view = has_out ? result : result.view({a.rows, a.dim});
  if (device.is_cuda()) {
#ifdef PIXELBERT_WITH_CUDA
    embed_layernorm_forward_cuda(a, eps, rows_view, dst_index, mean, rstd);
#else
    TORCH_CHECK(false, "embed_layernorm: pixelbert._C was built without CUDA; CUDA tensors need "
                "the triton or reference backend");
#endif
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(torch::kHalf, torch::kBFloat16, word.scalar_type(),
                                    "embed_layernorm_forward", [&] {
      forward_cpu<scalar_t>(a, eps, rows_view, dst_index, mean, rstd);
    });
  }
  return {result, mean, rstd};
}

std::vector<torch::Tensor> embed_layernorm_backward(
    const torch::Tensor& grad_in, const torch::Tensor& input_ids, const torch::Tensor& position_ids,
    const c10::optional<torch::Tensor>& token_type_ids, const torch::Tensor& word,
    const torch::Tensor& position, const c10::optional<torch::Tensor>& token_type,
    const torch::Tensor& weight, const torch::Tensor& bias, const torch::Tensor& mean,
    const torch::Tensor& rstd, const c10::optional<torch::Tensor>& out_index, bool need_word,
    bool need_position, bool need_type, bool need_weight, bool need_bias) {
  const EmbedArgs a = make_args(input_ids, position_ids, token_type_ids, word, position, token_type,
                                weight, bias);
  const auto device = word.device();
  TORCH_CHECK(grad_in.device() == device, "embed_layernorm backward: grad is on ", grad_in.device(),
              ", expected ", device);
  TORCH_CHECK(grad_in.dim() >= 1 && grad_in.size(-1) == a.dim,
              "embed_layernorm backward: grad must be [..., ", a.dim, "], got ", grad_in.sizes());
  for (const auto* stat : {&mean, &rstd}) {
    TORCH_CHECK(stat->scalar_type() == torch::kFloat32 && stat->dim() == 1 && stat->size(0) == a.rows &&
                    stat->is_contiguous() && stat->device() == device,
                "embed_layernorm backward: mean and rstd must be contiguous float32 [", a.rows, "]");
  }
  const bool has_out_index = out_index.has_value() && out_index->defined();
  torch::Tensor src_index;
  torch::Tensor grad = grad_in.to(word.scalar_type()).reshape({-1, a.dim});
  if (has_out_index) {
    TORCH_CHECK(grad_in.dim() == 2, "embed_layernorm backward: grad of an out buffer must be [M, D]");
    src_index = checked_index("embed_layernorm", "out_index", *out_index, a.rows, device);
  } else {
    TORCH_CHECK(grad.size(0) == a.rows, "embed_layernorm backward: grad has ", grad.size(0),
                " rows, ids ", a.rows);
  }
  grad = unit_column_stride(grad);

  torch::Tensor grad_word, grad_position, grad_type, grad_weight, grad_bias;
  if (need_word) grad_word = torch::zeros(a.word.sizes(), a.word.options());
  if (need_position) grad_position = torch::zeros(a.position.sizes(), a.position.options());
  if (need_type && a.token_type.defined()) {
    grad_type = torch::zeros(a.token_type.sizes(), a.token_type.options());
  }
  if (need_weight) grad_weight = torch::zeros({a.dim}, weight.options());
  if (need_bias) grad_bias = torch::zeros({a.dim}, bias.options());
  const bool anything = grad_word.defined() || grad_position.defined() || grad_type.defined() ||
                        grad_weight.defined() || grad_bias.defined();
  if (a.rows > 0 && a.dim > 0 && anything) {
    if (device.is_cuda()) {
#ifdef PIXELBERT_WITH_CUDA
      embed_layernorm_backward_cuda(a, grad, src_index, mean, rstd, grad_word, grad_position,
                                    grad_type, grad_weight, grad_bias);
#else
      TORCH_CHECK(false, "embed_layernorm: pixelbert._C was built without CUDA");
#endif
    } else {
      AT_DISPATCH_FLOATING_TYPES_AND2(torch::kHalf, torch::kBFloat16, word.scalar_type(),
                                      "embed_layernorm_backward", [&] {
        backward_cpu<scalar_t>(a, grad, src_index, mean, rstd, grad_word, grad_position, grad_type,
                               grad_weight, grad_bias);
      });
    }
  }
  return {grad_word, grad_position, grad_type, grad_weight, grad_bias};
}

}  // namespace pixelbert
