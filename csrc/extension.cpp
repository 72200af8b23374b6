// pixelbert._C: CPU (OpenMP) implementations of the engine's ops; CUDA ones are added
// beside them when the extension is built with a CUDA toolkit (PIXELBERT_WITH_CUDA).
// The fused ops' autograd wrappers are in pixelbert/ext_ops.py.
#include <torch/extension.h>

#include "ops.h"
#include "valid_index.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "PixelBERT C++/CUDA ops";
  m.def("valid_pooled_index", &pixelbert::valid_pooled_index,
        "Flat indices b*Hp*Wp + r*Wp + c of every valid cell of the pooled grid",
        py::arg("valid_sizes"), py::arg("grid_h"), py::arg("grid_w"));
  m.def("pool_sample_forward", &pixelbert::pool_sample_forward,
        "Rows `index` of the 2x2/stride-2 max-pooled feat (+ type_embedding), or written to "
        "out[out_index]; returns (result, uint8 window arg-max or None)",
        py::arg("feat"), py::arg("index"), py::arg("type_embedding") = py::none(),
        py::arg("out") = py::none(), py::arg("out_index") = py::none(),
        py::arg("save_argmax") = false);
  m.def("pool_sample_backward", &pixelbert::pool_sample_backward,
        "Gradients (feat, type_embedding) of pool_sample from the row gradients and the arg-max",
        py::arg("grad"), py::arg("index"), py::arg("argmax"), py::arg("out_index"),
        py::arg("feat_sizes"), py::arg("channels_last"), py::arg("need_feat"), py::arg("need_type"));
  m.def("embed_layernorm_forward", &pixelbert::embed_layernorm_forward,
        "layer_norm(word[ids] + position[position_ids] (+ type[token_type_ids])); returns "
        "(result, mean, rstd)",
        py::arg("input_ids"), py::arg("position_ids"), py::arg("token_type_ids"),
        py::arg("word_embeddings"), py::arg("position_embeddings"),
        py::arg("token_type_embeddings"), py::arg("weight"), py::arg("bias"), py::arg("eps"),
        py::arg("out") = py::none(), py::arg("out_index") = py::none());
  m.def("embed_layernorm_backward", &pixelbert::embed_layernorm_backward,
        "Gradients [word, position, token_type, weight, bias] of embed_layernorm (None where "
        "not asked for)",
        py::arg("grad"), py::arg("input_ids"), py::arg("position_ids"), py::arg("token_type_ids"),
        py::arg("word_embeddings"), py::arg("position_embeddings"),
        py::arg("token_type_embeddings"), py::arg("weight"), py::arg("bias"), py::arg("mean"),
        py::arg("rstd"), py::arg("out_index"), py::arg("need_word"), py::arg("need_position"),
        py::arg("need_type"), py::arg("need_weight"), py::arg("need_bias"));
#ifdef PIXELBERT_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
