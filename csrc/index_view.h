// IndexView: reads an int32 or int64 index array as int64, in host and device code alike
// (the element type is a per-array flag, tested once per row, not a template parameter: the
// ops take up to four index arrays, each of either type).
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#define PIXELBERT_HOST_DEVICE __host__ __device__
#else
#define PIXELBERT_HOST_DEVICE
#endif

namespace pixelbert {

struct IndexView {
  const void* data = nullptr;
  bool is64 = true;

  PIXELBERT_HOST_DEVICE int64_t operator[](int64_t i) const {
    return is64 ? static_cast<const int64_t*>(data)[i]
                : static_cast<int64_t>(static_cast<const int32_t*>(data)[i]);
  }
  PIXELBERT_HOST_DEVICE bool present() const { return data != nullptr; }
};

}  // namespace pixelbert
