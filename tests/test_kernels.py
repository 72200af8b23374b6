"""Every fast backend of the fused ops against `reference`, forward and every gradient.

On the CPU: `ext` (C++/OpenMP) and `triton` under TRITON_INTERPRET=1 (conftest sets it when
there is no GPU). Tests marked `gpu` run the same cases on CUDA tensors, bf16 included (the
Triton interpreter mishandles bf16, so bf16 Triton numerics are covered only there). Without a
GPU, every Triton launch the ops make, bf16 included, is still compiled for sm_90 (the end).
"""
import os
import subprocess
import sys

import pytest
import torch

from pixelbert import ops, reference

FAST = ("ext", "triton")
# fp32 ~1e-5 relative; half types carry ~3 (bf16 ~2) significant digits.
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
             torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}
GRAD_TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=1e-2, atol=1e-2),
                  torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}


@pytest.fixture(autouse=True)
def fixed_seed():
    torch.manual_seed(0)  # output gradients come from the global generator: same in any test order


def require(backend, device, dtype):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if backend not in ops.available_backends("pool_sample"):
        pytest.fail(ops.unavailable_reason(backend, "pool_sample", torch.device(device), dtype))
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter mishandles bf16; covered by the gpu tests")


def devices():
    return ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def leaf(tensor):
    return tensor.detach().clone().requires_grad_()


def assert_same_grads(ours, theirs, dtype):
    for name, (a, b) in {k: (ours[k], theirs[k]) for k in ours}.items():
        assert a.grad is not None, f"no gradient for {name}"
        torch.testing.assert_close(a.grad.float(), b.grad.float(), **GRAD_TOLERANCE[dtype], msg=name)


# ---- pool_sample ------------------------------------------------------------------------

def pool_case(shape, dtype, device, *, channels_last=False, rows=None, ties=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch, channels, height, width = shape
    if ties:  # few distinct values: most windows hold ties, broken as max_pool2d breaks them
        feat = torch.randint(-2, 3, shape, generator=g).to(dtype)
    else:
        feat = torch.randn(shape, generator=g).to(dtype)
    feat = feat.to(device)
    if channels_last:
        feat = feat.contiguous(memory_format=torch.channels_last)
    cells = batch * (height // 2) * (width // 2)
    count = cells if rows is None else min(rows, cells)
    index = torch.randperm(cells, generator=g)[:count].to(device)
    type_embedding = torch.randn(channels, generator=g).to(dtype).to(device)
    return feat, index, type_embedding


def run_pool(backend, feat, index, type_embedding, grad):
    leaves = {"feat": leaf(feat)}
    if type_embedding is not None:
        leaves["type_embedding"] = leaf(type_embedding)
    out = ops.pool_sample(leaves["feat"], index, leaves.get("type_embedding"), backend=backend)
    out.backward(grad)
    return out, leaves


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape, channels_last, with_type, index_dtype", [
    ((1, 3, 2, 2), False, True, torch.int64),       # one cell
    ((2, 5, 7, 9), False, True, torch.int32),       # odd H and W: the last row/column is dropped
    ((3, 771, 5, 6), True, True, torch.int64),      # C not a power of two, channels-last
    ((2, 768, 9, 11), True, False, torch.int32),
    ((4, 1000, 6, 5), False, True, torch.int64),
])
def test_pool_sample_matches_reference(device, backend, dtype, shape, channels_last, with_type, index_dtype):
    require(backend, device, dtype)
    feat, index, type_embedding = pool_case(shape, dtype, device, channels_last=channels_last,
                                            seed=shape[1] + shape[2])
    index = index.to(index_dtype)
    type_embedding = type_embedding if with_type else None
    grad = torch.randn(index.numel(), shape[1], device=device).to(dtype)
    out, ours = run_pool(backend, feat, index, type_embedding, grad)
    want, theirs = run_pool("reference", feat, index, type_embedding, grad)
    assert out.dtype == dtype and out.shape == want.shape
    torch.testing.assert_close(out, want, **TOLERANCE[dtype])
    assert_same_grads(ours, theirs, dtype)
    assert ours["feat"].grad.is_contiguous(memory_format=torch.channels_last) == channels_last


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_pool_sample_ties_follow_max_pool2d(device, backend, dtype):
    require(backend, device, dtype)
    feat, index, type_embedding = pool_case((2, 37, 8, 6), dtype, device, ties=True)
    grad = torch.randn(index.numel(), 37, device=device).to(dtype)
    _, ours = run_pool(backend, feat, index, type_embedding, grad)
    _, theirs = run_pool("reference", feat, index, type_embedding, grad)
    # Exact: each gradient element is copied, not computed, so it must land on the same element.
    torch.testing.assert_close(ours["feat"].grad, theirs["feat"].grad, rtol=0, atol=0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("rows", [1, 3000])
def test_pool_sample_row_counts(device, backend, rows):
    require(backend, device, torch.float32)
    feat, index, type_embedding = pool_case((16, 24, 30, 28), torch.float32, device, rows=rows, seed=rows)
    grad = torch.randn(index.numel(), 24, device=device)
    out, ours = run_pool(backend, feat, index, type_embedding, grad)
    want, theirs = run_pool("reference", feat, index, type_embedding, grad)
    torch.testing.assert_close(out, want, **TOLERANCE[torch.float32])
    assert_same_grads(ours, theirs, torch.float32)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", FAST)
def test_pool_sample_many_rows(device, backend):
    """100k rows; under the Triton interpreter a smaller count keeps CI fast."""
    require(backend, device, torch.float32)
    rows = 100_000 if device == "cuda" or backend == "ext" else 20_000
    feat, index, type_embedding = pool_case((100, 16, 64, 64), torch.float32, device, rows=rows)
    assert index.numel() == rows
    grad = torch.randn(rows, 16, device=device)
    out, ours = run_pool(backend, feat, index, type_embedding, grad)
    want, theirs = run_pool("reference", feat, index, type_embedding, grad)
    torch.testing.assert_close(out, want, **TOLERANCE[torch.float32])
    assert_same_grads(ours, theirs, torch.float32)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", ("reference",) + FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_pool_sample_writes_into_a_packed_buffer(device, backend, dtype):
    """Rows land at out_index of a poisoned buffer; other rows and their gradients pass through."""
    require(backend, device, dtype)
    feat, index, type_embedding = pool_case((3, 45, 7, 8), dtype, device)
    total = index.numel() + 11
    out_index = torch.randperm(total, device=device)[:index.numel()]
    before = torch.randn(total, 45, device=device).to(dtype)
    before[out_index] = float("nan")  # unwritten rows would fail the comparison
    grad = torch.randn(total, 45, device=device).to(dtype)

    def run(name):
        base = leaf(before)
        leaves = {"feat": leaf(feat), "type_embedding": leaf(type_embedding), "base": base}
        buffer = base.clone()  # a non-leaf buffer, as the packed sequence is
        out = ops.pool_sample(leaves["feat"], index, leaves["type_embedding"], out=buffer,
                              out_index=out_index.to(torch.int32), backend=name)
        assert out is buffer
        out.backward(grad)
        return out, leaves

    got, ours = run(backend)
    want, theirs = run("reference")
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])
    assert_same_grads(ours, theirs, dtype)
    assert (ours["base"].grad[out_index] == 0).all()  # overwritten rows get no gradient


@pytest.mark.parametrize("backend", ("reference",) + FAST)
def test_pool_sample_debug_mode_rejects_bad_indices(backend, monkeypatch):
    require(backend, "cpu", torch.float32)
    monkeypatch.setenv("PIXELBERT_DEBUG", "1")
    feat = torch.randn(2, 8, 4, 6)  # 2 * 2 * 3 = 12 cells
    with pytest.raises(ValueError, match=r"index holds values in \[0, 12\], outside \[0, 12\)"):
        ops.pool_sample(feat, torch.tensor([0, 12]), backend=backend)
    with pytest.raises(ValueError, match="outside"):
        ops.pool_sample(feat, torch.tensor([-1, 3]), backend=backend)
    with pytest.raises(ValueError, match="index holds duplicate values"):
        ops.pool_sample(feat, torch.tensor([4, 2, 4]), backend=backend)
    with pytest.raises(ValueError, match="out_index holds duplicate values"):
        ops.pool_sample(feat, torch.tensor([1, 2]), out=torch.zeros(5, 8),
                        out_index=torch.tensor([3, 3]), backend=backend)


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_pool_sample_beyond_32_bit_offsets(device):
    """A feature map of more than 2**31 elements: offsets past 2**31 must not wrap."""
    backends = [b for b in FAST if not (b == "triton" and device == "cpu")]  # interpreter: too big
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    shape = (2, 8, 16384, 8194)  # 2.15e9 elements, fp16: 4.3 GB
    feat = torch.empty(shape, dtype=torch.float16, device=device)
    feat[1, :, -2:, -2:] = torch.randn(8, 2, 2, dtype=torch.float16, device=device)
    feat[0, :, :2, :2] = torch.randn(8, 2, 2, dtype=torch.float16, device=device)
    cells = 8192 * 4097
    index = torch.tensor([2 * cells - 1, 0], device=device)  # the very last cell and the first
    for backend in backends:
        got = ops.pool_sample(feat, index, backend=backend)
        want = torch.stack([feat[1, :, -2:, -2:].amax((1, 2)), feat[0, :, :2, :2].amax((1, 2))])
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=backend)


# ---- embed_layernorm --------------------------------------------------------------------

def embed_case(shape, dim, vocab, dtype, device, *, with_types=True, repeated=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    max_pos, types = max(shape[-1], 2) + 3, 2
    ids = torch.randint(0, vocab, shape, generator=g)
    if repeated:  # the common case: a few ids (padding, [CLS], [SEP]) repeated many times
        ids = torch.where(torch.rand(shape, generator=g) < 0.9, torch.full(shape, 7), ids)
    pos = torch.arange(shape[-1]).expand(shape).contiguous()
    type_ids = torch.randint(0, types, shape, generator=g)
    tables = {
        "word": torch.randn(vocab, dim, generator=g),
        "position": torch.randn(max_pos, dim, generator=g),
        "token_type": torch.randn(types, dim, generator=g) if with_types else None,
        "weight": 1 + 0.5 * torch.randn(dim, generator=g),
        "bias": 0.5 * torch.randn(dim, generator=g),
    }
    tables = {k: None if v is None else v.to(dtype).to(device) for k, v in tables.items()}
    return ids.to(device), pos.to(device), type_ids.to(device) if with_types else None, tables


def as_float32(tables):
    return {k: None if v is None else v.float() for k, v in tables.items()}


def run_embed(backend, ids, pos, type_ids, tables, grad, eps=1e-12, **out_args):
    leaves = {k: leaf(v) for k, v in tables.items() if v is not None}
    out = ops.embed_layernorm(ids, pos, type_ids, leaves["word"], leaves["position"],
                              leaves.get("token_type"), leaves["weight"], leaves["bias"], eps,
                              backend=backend, **out_args)
    out.backward(grad)
    return out, leaves


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape, dim, vocab, with_types, index_dtype", [
    ((1, 1), 8, 5, True, torch.int64),          # one row
    ((3, 7), 771, 50, True, torch.int32),       # D not a power of two
    ((2, 40), 768, 30522, False, torch.int64),  # BERT's vocabulary, no token types
    ((5, 13), 1000, 97, True, torch.int64),
])
def test_embed_layernorm_matches_reference(device, backend, dtype, shape, dim, vocab, with_types, index_dtype):
    require(backend, device, dtype)
    ids, pos, type_ids, tables = embed_case(shape, dim, vocab, dtype, device, with_types=with_types, seed=dim)
    ids, pos = ids.to(index_dtype), pos.to(index_dtype)
    type_ids = None if type_ids is None else type_ids.to(index_dtype)
    grad = torch.randn(*shape, dim, device=device).to(dtype)
    out, ours = run_embed(backend, ids, pos, type_ids, tables, grad, eps=1e-5)
    # The reference in fp32 on the same rounded inputs: the fast backends accumulate in fp32,
    # while torch's CPU half-precision LayerNorm/embedding backward accumulates in half.
    want, theirs = run_embed("reference", ids, pos, type_ids, as_float32(tables), grad.float(), eps=1e-5)
    assert out.dtype == dtype and out.shape == want.shape
    torch.testing.assert_close(out, want.to(dtype), **TOLERANCE[dtype])
    assert_same_grads(ours, theirs, dtype)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_embed_layernorm_many_repeats_of_one_id(device, backend, dtype):
    """90% of 4,000 rows share word 7, all share a few positions and two types: the scatter must
    accumulate every repeat (in fp32) without losing updates."""
    require(backend, device, dtype)
    ids, pos, type_ids, tables = embed_case((100, 40), 96, 300, dtype, device, repeated=True)
    grad = torch.randn(100, 40, 96, device=device).to(dtype)
    _, ours = run_embed(backend, ids, pos, type_ids, tables, grad)
    # Against the reference run in fp32 on the same (rounded) inputs: a half-precision
    # accumulator would drift visibly over ~3,600 repeats; an fp32 one stays within rounding.
    _, exact = run_embed("reference", ids, pos, type_ids, as_float32(tables), grad.float())
    tolerance = dict(rtol=1e-4, atol=1e-3) if dtype == torch.float32 else dict(rtol=1e-2, atol=5e-2)
    for name in ours:
        torch.testing.assert_close(ours[name].grad.float(), exact[name].grad, **tolerance, msg=name)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", FAST)
def test_embed_layernorm_many_rows(device, backend):
    require(backend, device, torch.float32)
    rows = 100_000 if device == "cuda" or backend == "ext" else 8_000
    ids, pos, type_ids, tables = embed_case((rows // 40, 40), 64, 1000, torch.float32, device, repeated=True)
    grad = torch.randn(rows // 40, 40, 64, device=device)
    out, ours = run_embed(backend, ids, pos, type_ids, tables, grad)
    want, theirs = run_embed("reference", ids, pos, type_ids, tables, grad)
    torch.testing.assert_close(out, want, **TOLERANCE[torch.float32])
    # 90,000 repeats of one id summed in a different order: fp32 rounding grows with the count.
    for name in ours:
        torch.testing.assert_close(ours[name].grad, theirs[name].grad, rtol=1e-3, atol=2e-2, msg=name)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", ("reference",) + FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_embed_layernorm_writes_into_a_packed_buffer(device, backend, dtype):
    require(backend, device, dtype)
    ids, pos, type_ids, tables = embed_case((3, 9), 72, 40, dtype, device)
    total = ids.numel() + 20
    out_index = torch.randperm(total, device=device)[:ids.numel()]
    before = torch.randn(total, 72, device=device).to(dtype)
    before[out_index] = float("nan")
    grad = torch.randn(total, 72, device=device).to(dtype)

    def run(name, tables, before, grad):
        leaves = {k: leaf(v) for k, v in tables.items()}
        leaves["base"] = leaf(before)
        buffer = leaves["base"].clone()
        out = ops.embed_layernorm(ids, pos, type_ids, leaves["word"], leaves["position"],
                                  leaves["token_type"], leaves["weight"], leaves["bias"], 1e-12,
                                  out=buffer, out_index=out_index, backend=name)
        out.backward(grad)
        return out, leaves

    got, ours = run(backend, tables, before, grad)
    want, theirs = run("reference", as_float32(tables), before.float(), grad.float())  # as above
    assert not got.isnan().any()
    torch.testing.assert_close(got, want.to(dtype), **TOLERANCE[dtype])
    assert_same_grads(ours, theirs, dtype)
    assert (ours["base"].grad[out_index] == 0).all()


@pytest.mark.parametrize("backend", ("reference",) + FAST)
def test_embed_layernorm_debug_mode_rejects_bad_ids(backend, monkeypatch):
    require(backend, "cpu", torch.float32)
    monkeypatch.setenv("PIXELBERT_DEBUG", "1")
    ids, pos, type_ids, tables = embed_case((2, 5), 16, 10, torch.float32, "cpu")
    ids[1, 3] = 10
    with pytest.raises(ValueError, match=r"input_ids holds values outside \[0, 10\)"):
        ops.embed_layernorm(ids, pos, type_ids, *tables.values(), backend=backend)


# ---- dispatch ---------------------------------------------------------------------------

def test_auto_picks_ext_on_the_cpu_and_named_backends_fail_clearly(monkeypatch):
    monkeypatch.delenv("PIXELBERT_KERNELS", raising=False)
    cpu = torch.device("cpu")
    assert ops.resolve_backend("pool_sample", None, cpu, torch.float32) == "ext"
    assert ops.resolve_backend("embed_layernorm", None, cpu, torch.float16) == "ext"
    # float64 is the reference's alone: auto falls back to it, a named fast backend refuses.
    assert ops.resolve_backend("pool_sample", None, cpu, torch.float64) == "reference"
    with pytest.raises(RuntimeError, match="not torch.float64"):
        ops.pool_sample(torch.randn(1, 2, 2, 2, dtype=torch.float64), torch.tensor([0]), backend="ext")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.pool_sample(torch.randn(1, 2, 2, 2), torch.tensor([0]), backend="triton")
    monkeypatch.setenv("PIXELBERT_KERNELS", "reference")
    assert ops.resolve_backend("pool_sample", None, cpu, torch.float32) == "reference"


def test_triton_interpreter_with_an_incompatible_numpy_is_a_clear_error(monkeypatch):
    # triton <= 3.6's interpreter fails deep inside the kernels' loops under numpy >= 2.4 (seen
    # with torch 2.11's triton 3.6.0 and numpy 2.4.6); the triton backend names the fix instead.
    import numpy
    import triton
    monkeypatch.delenv("PIXELBERT_KERNELS", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cpu = torch.device("cpu")
    for triton_version, numpy_version, broken in (("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False),
                                                  ("3.7.0", "2.4.6", False), ("3.10.1", "3.0.0", False)):
        monkeypatch.setattr(triton, "__version__", triton_version)
        monkeypatch.setattr(numpy, "__version__", numpy_version)
        ops.interpreter_incompatibility.cache_clear()
        reason = ops.unavailable_reason("triton", "embed_layernorm", cpu, torch.float32)
        assert (reason is not None) == broken, (triton_version, numpy_version, reason)
        if broken:
            with pytest.raises(RuntimeError, match=r"numpy<2\.4' or triton >= 3\.7"):
                ops.pool_sample(torch.randn(1, 2, 2, 2), torch.tensor([0]), backend="triton")
            assert ops.resolve_backend("pool_sample", None, cpu, torch.float32) == "ext"
    monkeypatch.undo()
    ops.interpreter_incompatibility.cache_clear()


def test_reference_out_buffer_matches_plain_result():
    feat, index, type_embedding = pool_case((2, 6, 5, 5), torch.float32, "cpu")
    rows = reference.pool_sample(feat, index, type_embedding)
    out = torch.zeros(index.numel() + 2, 6)
    out_index = torch.arange(index.numel()) + 1
    reference.pool_sample(feat, index, type_embedding, out=out, out_index=out_index)
    torch.testing.assert_close(out[1:-1], rows)
    assert (out[0] == 0).all() and (out[-1] == 0).all()


# ---- lowering to GPU code -----------------------------------------------------------------

def without_interpreter(tmp_path) -> dict:
    """The environment of a process that compiles Triton kernels rather than interpreting them,
    with a cache of its own so that every kernel is compiled, never reused."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    return env


@pytest.mark.timeout(900)
def test_every_triton_launch_compiles_for_h100_in_every_dtype(tmp_path):
    # The interpreter above never lowers a kernel, and mishandles bf16: here each launch the
    # ops make (forward and backward, every flag combination, fp32/fp16/bf16 and bf16 tables
    # with fp32 parameters) is compiled for sm_90 down to a cubin.
    result = subprocess.run([sys.executable, "-m", "pixelbert.kernels.compile_check", "--arch", "90"],
                            env=without_interpreter(tmp_path), capture_output=True, text=True, timeout=840)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    compiled = {tuple(line.split()[2:4]) for line in result.stdout.splitlines() if line.startswith("ok ")}
    kernels = {"_pool_sample_fwd", "_pool_sample_bwd", "_embed_layernorm_fwd", "_embed_layernorm_bwd",
               "_segment_sum"}
    assert compiled == {(case, kernel) for case in ("fp32", "fp16", "bf16", "bf16+fp32") for kernel in kernels}
    assert "0 failed" in result.stdout.splitlines()[-1]


BROKEN_KERNEL = '''
import torch, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from pixelbert.kernels.compile_check import caught_launches, compile_launch

@triton.jit
def copy(x_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=offsets < n), mask=offsets < n)

for block in (4, 3):  # 3: tl.arange needs a power of two
    with caught_launches() as launches:
        copy[(1,)](torch.zeros(3, dtype=torch.bfloat16), 3, BLOCK=block)
    (launch,) = launches
    try:
        compile_launch(launch, GPUTarget("cuda", 90, 32))
        print(launch.describe(), "compiled")
    except Exception as error:
        print(launch.describe(), "failed:", type(error).__name__)
'''


def test_compile_check_catches_launches_and_reports_a_kernel_that_does_not_compile(tmp_path):
    script = tmp_path / "broken_kernel.py"  # @triton.jit reads its source from a file
    script.write_text(BROKEN_KERNEL)
    result = subprocess.run([sys.executable, str(script)], env=without_interpreter(tmp_path),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == ["copy [*bf16] BLOCK=4 warps=4 compiled",
                                          "copy [*bf16] BLOCK=3 warps=4 failed: CompilationError"]


def test_compile_check_refuses_the_interpreter():
    result = subprocess.run([sys.executable, "-m", "pixelbert.kernels.compile_check"],
                            env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "without TRITON_INTERPRET=1" in result.stderr
