"""Compile every Triton launch of the fused ops for a GPU architecture, on a machine without one.

    python -m pixelbert.kernels.compile_check [--arch 90]

The CPU tests run the kernels in Triton's interpreter, which proves their numerics in fp32 and
fp16 but never lowers them to GPU code and mishandles bf16. This runs the ops' real forward and
backward wrappers on CPU tensors (fp32, fp16, bf16, and bf16 tables beside fp32 LayerNorm and
type parameters, as under autocast), catches each kernel launch instead of running it, and
compiles what was caught for the target through Triton's own pipeline down to a cubin (its
bundled ptxas). A type error, an op the target lacks or a block that needs more shared memory
than the GPU has fails here, before any GPU time is spent. It checks compilation only: the
numerics of the compiled code are what the `gpu`-marked tests check.

Runs without TRITON_INTERPRET=1 (under it the kernels are interpreted functions, not compiled).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from .embed_layernorm import embed_layernorm
from .pool_sample import pool_sample

POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
                 torch.int32: "*i32", torch.int64: "*i64"}
# H100/H200 (sm_90) and A100 (sm_80) give a block at most 227 KB / 163 KB of shared memory.
SHARED_MEMORY_LIMIT = {90: 227 * 1024, 80: 163 * 1024}


@dataclass(frozen=True)
class Launch:
    """One caught launch: the kernel, its Triton signature and constexpr values, its warps."""
    kernel: JITFunction
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, object], ...]
    num_warps: int

    def describe(self) -> str:
        pointers = sorted({kind for _, kind in self.signature if kind.startswith("*f") or kind.startswith("*b")})
        flags = ", ".join(f"{name}={value}" for name, value in self.constexprs if value is not None)
        return f"{self.kernel.__name__} [{' '.join(pointers)}] {flags} warps={self.num_warps}"


def argument_type(value) -> str:
    """Triton's signature type of one runtime argument."""
    if isinstance(value, torch.Tensor):
        if value.dtype not in POINTER_TYPES:
            raise TypeError(f"no kernel of this package takes a {value.dtype} tensor")
        return POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unexpected kernel argument of type {type(value).__name__}")


def require_compiler() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":  # the kernels are then interpreted functions
        raise RuntimeError("compile_check lowers the kernels to GPU code: run it without TRITON_INTERPRET=1")


@contextlib.contextmanager
def caught_launches():
    """Within the block, kernel launches are recorded into the yielded set instead of run."""
    require_compiler()
    launches: set[Launch] = set()
    run = JITFunction.run

    def catch(kernel, *args, grid, warmup, **kwargs):
        bound = dict(zip(kernel.arg_names, args))
        bound.update((name, kwargs[name]) for name in kernel.arg_names[len(args):])
        constexpr_names = {param.name for param in kernel.params if param.is_constexpr}
        signature, constexprs = [], []
        for name in kernel.arg_names:
            value = bound[name]
            if name in constexpr_names or value is None:
                signature.append((name, "constexpr"))
                constexprs.append((name, value))
            else:
                signature.append((name, argument_type(value)))
        launches.add(Launch(kernel, tuple(signature), tuple(constexprs), kwargs.get("num_warps", 4)))

    JITFunction.run = catch
    try:
        yield launches
    finally:
        JITFunction.run = run


def pool_sample_cases(dtype: torch.dtype, type_dtype: torch.dtype):
    """pool_sample forward and backward in every form the engine calls it: NCHW and channels-last,
    with and without a type vector, int32/int64 cells, into a new tensor or a packed buffer, with
    gradients for the features, the type vector or both; C of the tiny CNN up to ResNet's 2,048."""
    for channels, rows in ((64, 5), (256, 100), (2048, 700)):
        for channels_last, with_type, index_dtype, packed in ((False, True, torch.int64, False),
                                                              (True, True, torch.int32, True),
                                                              (True, False, torch.int64, True)):
            feat = torch.randn(2, channels, 40, 40, dtype=dtype)
            if channels_last:
                feat = feat.to(memory_format=torch.channels_last)
            index = torch.randperm(2 * 20 * 20)[:rows].to(index_dtype)
            type_vector = torch.randn(channels, dtype=type_dtype) if with_type else None
            for feat_grad, type_grad in ((True, with_type), (False, with_type), (True, False)):
                if not (feat_grad or type_grad):
                    continue
                feat_in = feat.detach().requires_grad_(feat_grad)
                type_in = type_vector.detach().requires_grad_(type_grad) if with_type else None
                out, out_index = None, None
                if packed:
                    out = torch.zeros(index.numel() + 7, channels, dtype=dtype)
                    out_index = torch.randperm(out.shape[0])[:index.numel()].to(index_dtype)
                rows_out = pool_sample(feat_in, index, type_in, out=out, out_index=out_index)
                rows_out.backward(torch.randn_like(rows_out))


def embed_layernorm_cases(dtype: torch.dtype, norm_dtype: torch.dtype):
    """embed_layernorm forward and backward: tiny, BERT-base and BERT-large widths, with and
    without token types, into a new tensor or a packed buffer, every table trained or frozen
    (the frozen case skips dX), ids that repeat past one segment-sum chunk (its two passes)."""
    for dim in (128, 768, 1024):
        for with_type, index_dtype, packed, tables_grad in ((True, torch.int64, False, True),
                                                            (False, torch.int32, True, True),
                                                            (True, torch.int32, True, False)):
            vocab, tokens = 30522, (8, 41)
            word = torch.randn(vocab, dim, dtype=dtype).requires_grad_(tables_grad)
            position = torch.randn(512, dim, dtype=dtype).requires_grad_(tables_grad)
            token_type = torch.randn(2, dim, dtype=dtype).requires_grad_(tables_grad) if with_type else None
            weight = torch.randn(dim, dtype=norm_dtype).requires_grad_()
            bias = torch.randn(dim, dtype=norm_dtype).requires_grad_()
            input_ids = torch.randint(0, vocab, tokens).to(index_dtype)
            input_ids.view(-1)[:300] = 7  # an id on more rows than one segment-sum chunk
            position_ids = torch.arange(tokens[1]).expand(tokens).to(index_dtype)
            type_ids = torch.randint(0, 2, tokens).to(index_dtype) if with_type else None
            out, out_index = None, None
            if packed:
                out = torch.zeros(input_ids.numel() + 9, dim, dtype=dtype)
                out_index = torch.randperm(out.shape[0])[:input_ids.numel()].to(index_dtype)
            rows_out = embed_layernorm(input_ids, position_ids, type_ids, word, position, token_type,
                                       weight, bias, out=out, out_index=out_index)
            rows_out.backward(torch.randn_like(rows_out))


DTYPE_CASES = {  # name: (data dtype, dtype of the type vector / LayerNorm parameters)
    "fp32": (torch.float32, torch.float32),
    "fp16": (torch.float16, torch.float16),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "bf16+fp32": (torch.bfloat16, torch.float32),
}


def compile_launch(launch: Launch, target: GPUTarget) -> dict:
    """Compile one caught launch to a cubin; its shared memory and the time it took."""
    start = time.perf_counter()
    source = ASTSource(launch.kernel, dict(launch.signature), dict(launch.constexprs))
    compiled = triton.compile(source, target=target, options={"num_warps": launch.num_warps})
    if not compiled.asm.get("cubin"):
        raise RuntimeError("no cubin produced")
    return {"shared": compiled.metadata.shared, "seconds": time.perf_counter() - start}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90: H100/H200)")
    args = parser.parse_args(argv)
    try:
        require_compiler()
    except RuntimeError as error:
        print(error, file=sys.stderr)
        return 2
    target = GPUTarget("cuda", args.arch, 32)
    shared_limit = SHARED_MEMORY_LIMIT.get(args.arch)
    failures, compiled = 0, 0
    for name, (dtype, side_dtype) in DTYPE_CASES.items():
        with caught_launches() as launches:
            pool_sample_cases(dtype, side_dtype)
            embed_layernorm_cases(dtype, side_dtype)
        for launch in sorted(launches, key=Launch.describe):
            try:
                result = compile_launch(launch, target)
            except Exception as error:  # report every failing launch, not only the first
                failures += 1
                print(f"FAIL sm_{args.arch} {name:9s} {launch.describe()}\n  {type(error).__name__}: {error}")
                continue
            if shared_limit is not None and result["shared"] > shared_limit:
                failures += 1
                print(f"FAIL sm_{args.arch} {name:9s} {launch.describe()}: {result['shared']} B of shared "
                      f"memory, the GPU gives a block {shared_limit} B")
                continue
            compiled += 1
            print(f"ok   sm_{args.arch} {name:9s} {launch.describe()} shared={result['shared']} B "
                  f"{result['seconds']:.2f} s")
    print(f"triton {triton.__version__}, sm_{args.arch}: {compiled} launches compiled, {failures} failed")
    return 1 if failures or not compiled else 0


if __name__ == "__main__":
    sys.exit(main())
