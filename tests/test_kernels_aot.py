"""The Triton kernels compile for an H100 (sm_90) without a GPU: Triton's own compiler and bundled
ptxas, ahead of time, in a subprocess without TRITON_INTERPRET (the interpreter accepts code that
the compiler rejects). Representative constexpr branches of every kernel, fp32 and bf16."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.triton, pytest.mark.slow]

SCRIPT = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from tldr_fast.kernels import diversity as kd, tv_pixel as kt

    def build(fn, pointers, constexprs, num_warps):
        sig = {a: "constexpr" if a in constexprs else pointers.get(a, "i32") for a in fn.arg_names}
        src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})

    for dt in ("fp32", "bf16"):
        p, bf16 = "*" + dt, dt == "bf16"
        f32 = dict.fromkeys(["r_ptr", "nrm2_ptr", "out_ptr", "s_ptr", "c1_ptr", "scratch",
                             "part_tv", "part_pix", "w_tv_ptr", "w_pix_ptr"], "*fp32")
        build(kd._row_norms_kernel, {**f32, "F": p}, {"EPS": kd.EPS, "BLOCK_N": 64, "BLOCK_D": 64}, 8)
        for sk, sm, ws in [(True, False, True), (False, True, False)]:
            build(kd._gram_kernel, {**f32, "X": p},
                  {"SCALE_K": sk, "SCALE_M": sm, "WRITE_S": ws, "DOT_BF16": bf16,
                   "PRECISION": "tf32x3", "BLOCK_K": 32, "BLOCK_M": 64}, 8)
        for feature, single, proj in [(True, True, True), (False, False, False)]:
            build(kd._grad_kernel, {**f32, "A": p if feature else "*fp32", "Bm": "*fp32" if feature else p,
                                    "F": p, "out": p},
                  {"EPS": kd.EPS, "ALPHA_R": feature and proj, "PROJECT_U": proj, "DOT_BF16": bf16,
                   "PRECISION": "tf32x3", "SINGLE_TILE": single, "BLOCK_N": 32 if single else 16,
                   "BLOCK_K": 32, "BLOCK_D": 256 if single else 128}, 8 if single else 4)
        build(kt._tv_pixel_kernel, {**f32, "X": p, "grad": p},
              {"WRITE_LOSS": True, "WRITE_GRAD": True, "BLOCK_P": 4, "BLOCK_HW": 1024}, 8)
    print("compiled")
""")


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
