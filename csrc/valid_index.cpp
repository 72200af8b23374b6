// Enumerates the valid (unpadded) cells of a batch of pooled feature grids, image by image,
// row-major: the pixel tokens of fine-tuning, where every valid position is kept.
#include "valid_index.h"

#include <vector>

namespace pixelbert {

torch::Tensor valid_pooled_index(const torch::Tensor& valid_sizes, int64_t grid_h, int64_t grid_w) {
  TORCH_CHECK(valid_sizes.device().is_cpu(), "valid_pooled_index: valid_sizes must be a CPU tensor");
  TORCH_CHECK(valid_sizes.dim() == 2 && valid_sizes.size(1) == 2,
              "valid_pooled_index: valid_sizes must be [B, 2], got ", valid_sizes.sizes());
  TORCH_CHECK(grid_h > 0 && grid_w > 0, "valid_pooled_index: grid must be non-empty");
  const auto sizes = valid_sizes.to(torch::kInt64).contiguous();
  const int64_t batch = sizes.size(0);
  const int64_t* hw = sizes.data_ptr<int64_t>();

  // Exclusive prefix sum of the per-image counts gives each image its output slice.
  std::vector<int64_t> start(batch + 1, 0);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t h = hw[2 * b], w = hw[2 * b + 1];
    TORCH_CHECK(h >= 1 && h <= grid_h && w >= 1 && w <= grid_w, "valid_pooled_index: image ", b,
                " has valid size ", h, "x", w, " outside the ", grid_h, "x", grid_w, " grid");
    start[b + 1] = start[b] + h * w;
  }
  auto out = torch::empty({start[batch]}, sizes.options());
  int64_t* dst = out.data_ptr<int64_t>();
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t w = hw[2 * b + 1];
    const int64_t cells = hw[2 * b] * w;
    for (int64_t i = 0; i < cells; ++i) {
      dst[start[b] + i] = b * grid_h * grid_w + (i / w) * grid_w + (i % w);
    }
  }
  return out;
}

}  // namespace pixelbert
