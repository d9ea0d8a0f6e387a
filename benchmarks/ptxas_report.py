"""Compile the attention and scoring Triton kernels for a GPU, without one: registers, spills, shared memory, MMAs.

    python benchmarks/ptxas_report.py [--arch 90] [--dtype bf16]

Each kernel is compiled ahead of time with the installed Triton at Llama-3-8B shapes (32 query heads, 8 KV heads,
head_dim 128) and the tile sizes its launcher picks, then assembled by the ptxas bundled with Triton (`-v`). Pointers
and strides are declared 16-aligned, as a real launch specialises them. It catches what the interpreter cannot:
compile errors, register spills, tensor-core use (wgmma on sm_90, mma.sync otherwise). Results depend on the Triton
version: compile with the one the GPU machine runs. Must run without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile

SHAPES = dict(GROUP=4, HEAD_DIM=128, BLOCK_D=128)
# kernel module, kernel, {pointer argument: element type ("x" = --dtype)}, constexprs, num_warps, num_stages.
# Arguments not listed as pointers are i32, except scale_log2 (fp32).
KERNELS = [
    ("sparse_attention", "_sparse_attention_kernel",
     dict(q="x", k="x", v="x", out="x", q_pos="i64", k_pos="i64", order="i64", key_end="i32"),
     dict(SHAPES, BLOCK_M=128, BLOCK_N=64), 8, 2),
    ("query_scores", "_stats_kernel", dict(q="x", k="x", lse="fp32"),
     dict(SHAPES, BLOCK_S=64, BLOCK_N=64), 4, 3),
    ("query_scores", "_scores_kernel", dict(q="x", k="x", lse="fp32", prophet_out="fp32", norm_out="fp32"),
     dict(SHAPES, HAS_PROPHET=True, HAS_NORM=True, BLOCK_S=64, BLOCK_N=64), 4, 3),
    ("stage1_attention", "_attention_kernel",
     dict(q="x", k="x", v="x", q_pos="i64", k_pos="i64", part_out="fp32", part_lse="fp32", part_lse_ctx="fp32",
          bounds="i32"),
     dict(SHAPES, Q_HEADS=32, HAS_BOUNDS=True, BLOCK_M=64, BLOCK_N=64), 4, 2),
    ("stage1_attention", "_scores_combine_kernel",
     dict(q="x", k="x", part_out="fp32", part_lse="fp32", part_lse_ctx="fp32", out="x", prophet_out="fp32",
          norm_out="fp32", bounds="i32"),
     dict(SHAPES, Q_HEADS=32, HAS_BOUNDS=True, HAS_PROPHET=True, HAS_NORM=True, BLOCK_S=32, BLOCK_N=64,
          BLOCK_SPLITS=16), 4, 2),
]


def report(module: str, name: str, pointers: dict, constexprs: dict, warps: int, stages: int, arch: int,
           dtype: str) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from prophet_rag.kernels.triton_util import lazy_jit

    fn = lazy_jit(getattr(importlib.import_module(f"prophet_rag.kernels.{module}"), name))
    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in pointers:
            signature[arg] = "*" + (dtype if pointers[arg] == "x" else pointers[arg])
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[arg] = "fp32" if arg == "scale_log2" else "i32"
            if arg.startswith("stride") or arg in ("keys_per_split", "tokens_per_split"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=stages))
    ptx = kernel.asm["ptx"]
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    suffix = "a" if arch == 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        # The newest bundled ptxas that accepts this PTX version.
        for ptxas in ("ptxas", "ptxas-blackwell"):
            done = subprocess.run([os.path.join(bin_dir, ptxas), f"-arch=sm_{arch}{suffix}", "-v", path, "-o",
                                   path + ".cubin"], capture_output=True, text=True)
            if done.returncode == 0:
                break
        else:
            return f"ptxas failed: {done.stderr.strip()}"
    regs = re.search(r"Used (\d+) registers", done.stderr)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", done.stderr)
    return (f"{regs.group(1) if regs else '?':>4} regs  spills {spills.group(1) if spills else '?':>4} B  "
            f"smem {kernel.metadata.shared // 1024:>3} KiB  wgmma {ptx.count('wgmma.mma_async'):>3}  "
            f"mma.sync {ptx.count('mma.sync'):>3}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("ptxas_report: unset TRITON_INTERPRET (the interpreter compiles nothing).")
        return 1
    import triton

    print(f"Triton {triton.__version__}, sm_{args.arch}, {args.dtype}, GQA group 4, head_dim 128")
    for module, name, pointers, constexprs, warps, stages in KERNELS:
        result = report(module, name, pointers, constexprs, warps, stages, args.arch, args.dtype)
        print(f"{module + '.' + name:<45} {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
