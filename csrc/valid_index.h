#pragma once
#include <torch/extension.h>

namespace pixelbert {
// valid_sizes: int64 [B, 2], the valid (rows, cols) of each image's pooled grid.
torch::Tensor valid_pooled_index(const torch::Tensor& valid_sizes, int64_t grid_h, int64_t grid_w);
}  // namespace pixelbert
