// Argument checks shared by the fused ops: index tensors, and the optional output buffer
// (`out` [M, D] with `out_index` [rows]) that lets an op write straight into a packed sequence.
#include "ops.h"

namespace pixelbert {

torch::Tensor checked_index(const char* op, const char* name, const torch::Tensor& t, int64_t rows,
                            const torch::Device& device) {
  TORCH_CHECK(t.scalar_type() == torch::kInt32 || t.scalar_type() == torch::kInt64, op, ": ", name,
              " must be int32 or int64, got ", t.scalar_type());
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), ", expected ", device);
  TORCH_CHECK(t.dim() == 1 && (rows < 0 || t.size(0) == rows), op, ": ", name, " must be 1-D",
              rows < 0 ? "" : " with one entry per row", ", got ", t.sizes());
  return t.contiguous();
}

torch::Tensor checked_out_buffer(const char* op, const c10::optional<torch::Tensor>& out,
                                 const c10::optional<torch::Tensor>& out_index, int64_t rows,
                                 int64_t dim, const torch::Tensor& like, torch::Tensor& dst_index) {
  const bool has_out = out.has_value() && out->defined();
  const bool has_out_index = out_index.has_value() && out_index->defined();
  TORCH_CHECK(has_out == has_out_index, op, ": out and out_index go together");
  if (!has_out) return torch::Tensor();
  const torch::Tensor& buffer = *out;
  TORCH_CHECK(buffer.dim() == 2 && buffer.size(1) == dim, op, ": out must be [M, ", dim, "], got ",
              buffer.sizes());
  TORCH_CHECK(buffer.scalar_type() == like.scalar_type() && buffer.device() == like.device(), op,
              ": out is ", buffer.scalar_type(), " on ", buffer.device(), ", expected ",
              like.scalar_type(), " on ", like.device());
  TORCH_CHECK(buffer.stride(1) == 1 || dim == 1, op, ": out must have unit stride along its last dimension");
  dst_index = checked_index(op, "out_index", *out_index, rows, like.device());
  return buffer;
}

}  // namespace pixelbert
