"""The reference ops against independent, naive definitions; and the dispatch layer."""
import pytest
import torch

from pixelbert import ops, reference


def naive_pool_sample(feat, index, type_embedding):
    """Each index's 2x2 window, read element by element."""
    batch, channels, height, width = feat.shape
    grid_h, grid_w = height // 2, width // 2
    rows = []
    for flat in index.tolist():
        b, cell = divmod(flat, grid_h * grid_w)
        r, c = divmod(cell, grid_w)
        window = feat[b, :, 2 * r:2 * r + 2, 2 * c:2 * c + 2].reshape(channels, 4)
        rows.append(window.max(dim=1).values)
    out = torch.stack(rows)
    return out if type_embedding is None else out + type_embedding


@pytest.mark.parametrize("shape", [(1, 3, 2, 2), (2, 5, 7, 9), (3, 17, 11, 6), (2, 64, 13, 15)])
@pytest.mark.parametrize("with_type", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pool_sample_matches_window_max(shape, with_type, channels_last):
    torch.manual_seed(sum(shape))
    batch, channels, height, width = shape
    feat = torch.randn(shape, dtype=torch.float64)
    if channels_last:
        feat = feat.contiguous(memory_format=torch.channels_last)
    cells = batch * (height // 2) * (width // 2)
    index = torch.randperm(cells)[: max(1, cells // 2)]
    type_embedding = torch.randn(channels, dtype=torch.float64) if with_type else None

    leaves = [feat.clone().requires_grad_()] + ([type_embedding.clone().requires_grad_()] if with_type else [])
    out = ops.pool_sample(leaves[0], index, leaves[1] if with_type else None, backend="reference")
    naive_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    expected = naive_pool_sample(naive_leaves[0], index, naive_leaves[1] if with_type else None)
    torch.testing.assert_close(out, expected)

    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for got, want in zip(leaves, naive_leaves):
        torch.testing.assert_close(got.grad, want.grad)
    # The feature gradient lands only on each window's arg-max: one non-zero per channel and row.
    assert int((leaves[0].grad != 0).sum()) == out.numel()


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_pool_sample_index_dtypes(index_dtype):
    feat = torch.randn(2, 4, 6, 8)
    index = torch.tensor([0, 5, 23], dtype=index_dtype)
    torch.testing.assert_close(reference.pool_sample(feat, index), naive_pool_sample(feat, index.long(), None))


def naive_embed_layernorm(ids, pos, types, word, position, token_type, weight, bias, eps):
    summed = word[ids] + position[pos] + (token_type[types] if token_type is not None else 0)
    mean = summed.mean(-1, keepdim=True)
    var = ((summed - mean) ** 2).mean(-1, keepdim=True)
    return (summed - mean) / torch.sqrt(var + eps) * weight + bias


@pytest.mark.parametrize("batch, length, dim, vocab", [(1, 1, 8, 5), (3, 7, 771, 50), (2, 40, 64, 30)])
@pytest.mark.parametrize("with_types", [True, False])
def test_embed_layernorm_matches_manual(batch, length, dim, vocab, with_types):
    torch.manual_seed(dim)
    ids = torch.randint(0, vocab, (batch, length))
    ids[0, : length // 2 + 1] = 3 % vocab  # many repeats of one id: gradients must accumulate
    pos = torch.arange(length).expand(batch, length)
    types = torch.randint(0, 2, (batch, length)) if with_types else None
    tables = [torch.randn(vocab, dim, dtype=torch.float64), torch.randn(length, dim, dtype=torch.float64),
              torch.randn(2, dim, dtype=torch.float64) if with_types else None,
              torch.randn(dim, dtype=torch.float64), torch.randn(dim, dtype=torch.float64)]
    ours = [t.clone().requires_grad_() if t is not None else None for t in tables]
    naive = [t.clone().requires_grad_() if t is not None else None for t in tables]
    out = ops.embed_layernorm(ids, pos, types, ours[0], ours[1], ours[2], ours[3], ours[4], 1e-12,
                              backend="reference")
    want = naive_embed_layernorm(ids, pos, types, naive[0], naive[1], naive[2], naive[3], naive[4], 1e-12)
    torch.testing.assert_close(out, want)
    grad = torch.randn_like(out)
    out.backward(grad)
    want.backward(grad)
    for got, expected in zip(ours, naive):
        if got is not None:
            torch.testing.assert_close(got.grad, expected.grad)


def test_embed_layernorm_needs_type_ids_with_type_table():
    with pytest.raises(ValueError, match="token_type_ids"):
        reference.embed_layernorm(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long),
                                  None, torch.randn(3, 4), torch.randn(3, 4), torch.randn(2, 4),
                                  torch.ones(4), torch.zeros(4))


def test_valid_pooled_index_backends_agree():
    torch.manual_seed(0)
    sizes = torch.stack([torch.randint(1, 6, (7,)), torch.randint(1, 9, (7,))], dim=1)
    want = [b * 6 * 9 + r * 9 + c for b, (h, w) in enumerate(sizes.tolist()) for r in range(h) for c in range(w)]
    for backend in ops.available_backends("valid_pooled_index"):
        assert ops.valid_pooled_index(sizes, 6, 9, backend=backend).tolist() == want, backend
    assert "ext" in ops.available_backends("valid_pooled_index"), "the C++ extension was not built"


def test_ext_rejects_bad_sizes():
    with pytest.raises(RuntimeError, match="outside the 2x2 grid"):
        ops.valid_pooled_index(torch.tensor([[3, 1]]), 2, 2, backend="ext")


def test_dispatch_names_and_errors(monkeypatch):
    monkeypatch.delenv("PIXELBERT_KERNELS", raising=False)
    cpu = torch.device("cpu")
    assert ops.resolve_backend("valid_pooled_index", None, cpu) == "ext"
    with pytest.raises(ValueError, match="unknown kernel backend"):
        ops.resolve_backend("pool_sample", "fastest", cpu)
    with pytest.raises(RuntimeError, match="has no implementation of valid_pooled_index"):
        ops.valid_pooled_index(torch.tensor([[1, 1]]), 2, 2, backend="triton")
    monkeypatch.setenv("PIXELBERT_KERNELS", "reference")
    assert ops.resolve_backend("valid_pooled_index", None, cpu) == "reference"
    assert ops.resolve_backend("pool_sample", None, cpu) == "reference"
    monkeypatch.delenv("PIXELBERT_KERNELS")
    ops.set_default_backend("triton")  # as model.kernels="triton" does
    try:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            ops.resolve_backend("embed_layernorm", None, cpu)
    finally:
        ops.set_default_backend(None)


def test_a_backend_that_failed_to_import_says_why(monkeypatch):
    """A broken install (e.g. kernels/ not mapped to pixelbert.kernels) is told apart from a
    backend that does not implement the op: the import error is in the message."""
    monkeypatch.setitem(ops._IMPORT_ERRORS, "triton", "No module named 'pixelbert.kernels'")
    monkeypatch.delitem(ops._REGISTRY["pool_sample"], "triton", raising=False)
    with pytest.raises(RuntimeError, match=r"its import failed: No module named 'pixelbert.kernels'"):
        ops.resolve_backend("pool_sample", "triton", torch.device("cpu"))
