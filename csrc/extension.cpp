// pixelbert._C: CPU (OpenMP) implementations of the engine's ops; CUDA ones are added
// beside them when the extension is built with a CUDA toolkit (PIXELBERT_WITH_CUDA).
#include <torch/extension.h>

#include "valid_index.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "PixelBERT C++/CUDA ops";
  m.def("valid_pooled_index", &pixelbert::valid_pooled_index,
        "Flat indices b*Hp*Wp + r*Wp + c of every valid cell of the pooled grid",
        py::arg("valid_sizes"), py::arg("grid_h"), py::arg("grid_w"));
#ifdef PIXELBERT_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
