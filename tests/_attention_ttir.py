"""Static check of the attention kernels (run as a script, without TRITON_INTERPRET): compile each
kernel to Triton IR for sm_90 (no GPU or driver needed) and count sin/cos ops, in and out of loops.

Prints one JSON object: "ttir": kernel variant -> {"sincos": n, "sincos_in_loops": m, "loops": l};
"do_not_specialize": kernel -> the names Triton will not specialise. Used by
tests/test_attention.py; also handy by hand: `python tests/_attention_ttir.py`.
"""

from __future__ import annotations

import json
import os
import re
import sys

_TRIG = re.compile(r"\bmath\.(sin|cos)\b|__nv_(sin|cos)")
_LOOP = re.compile(r"\bscf\.(for|while)\b")


def trig_in_loops(ttir: str) -> tuple[int, int]:
    """(sin/cos ops, those inside an scf.for / scf.while region) of a TTIR module's text."""
    stack: list[bool] = []  # one entry per open region: is it a loop body?
    total = in_loops = 0
    for line in ttir.splitlines():
        text = line.strip()
        closes = text.startswith("}")
        if closes and stack:
            stack.pop()
        if _TRIG.search(text):
            total += 1
            in_loops += any(stack)
        if text.endswith("{"):
            # a region opened by scf.for / scf.while, or the "} do {" body of an scf.while, is a loop
            stack.append(bool(_LOOP.search(text)) or text.startswith("} do"))
    return total, in_loops


def ttir_of(fn, types: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3, capability: int = 90):
    """Optimised TTIR (after inlining) of jit function fn for a CUDA target, as text."""
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend

    signature = {}
    for name in fn.arg_names:
        signature[name] = "constexpr" if name in constexprs else types[name]
    src = ASTSource(fn, signature, constexprs)
    target = GPUTarget("cuda", capability, 64)
    backend = make_backend(target)
    options = backend.parse_options({"num_warps": num_warps, "num_stages": num_stages})
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = src.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(),
                         context)
    stages = {}
    backend.add_stages(stages, options, src.language)
    metadata = {"hash": "0", "target": target, **options.__dict__}
    return str(stages["ttir"](module, metadata))


def _types(fn, dtype="bf16"):
    floats = {"log2_theta", "log2_theta_lo", "qk_scale", "sm_scale", "sign"}
    fp32_ptrs = {"LSE", "DELTA", "DLSE", "POS", "POS_Q", "POS_K", "COS_Q", "SIN_Q", "COS_K", "SIN_K", "TAB"}
    int_ptrs = {"CU", "GRID", "CU_Q", "CU_K", "GRID_Q", "GRID_K"}
    types = {}
    for name in fn.arg_names:
        if name in floats:
            types[name] = "fp32"
        elif name in fp32_ptrs:
            types[name] = "*fp32"
        elif name in int_ptrs:
            types[name] = "*i32"
        elif name.isupper():
            types[name] = f"*{dtype}"
        else:
            types[name] = "i32"
    return types


def survey(head_dim: int = 64, dtype: str = "bf16", block_m: int = 128, block_n: int = 64) -> dict:
    """sin/cos counts for every attention kernel (grid_thw rotation, non-causal and causal)."""
    from sigvlp.kernels import attention as kern

    half = head_dim // 2
    results = {}
    kernels = getattr(kern, "STATIC_CHECK_KERNELS", ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"))
    for name in kernels:
        fn = getattr(kern, name)
        for rot in ("grid", "positions"):
            for causal in (False, True):
                meta = dict(HEAD_DIM=head_dim, HALF=half, HALF_PAD=max(16, half), D_PAD=head_dim, ROTATE=True,
                            USE_POSITIONS=rot == "positions", INTERLEAVED=False, CAUSAL=causal, PAIRS_EXACT=True,
                            DIMS_EXACT=True, DOT_PREC="tf32", BLOCK_M=block_m, BLOCK_N=block_n)
                for extra in ("USE_POSITIONS_Q", "USE_POSITIONS_K"):
                    if extra in fn.arg_names:
                        meta[extra] = rot == "positions"
                meta = {k: v for k, v in meta.items() if k in fn.arg_names}
                ttir = ttir_of(fn, _types(fn, dtype), meta)
                total, in_loops = trig_in_loops(ttir)
                results[f"{name}[{rot},{'causal' if causal else 'full'}]"] = {
                    "sincos": total, "sincos_in_loops": in_loops, "loops": len(_LOOP.findall(ttir))}
    return results


def specialisation_lists() -> dict:
    """Kernel name -> its do_not_specialize names, for every Triton kernel the attention op launches."""
    from sigvlp.kernels import attention as kern
    from sigvlp.kernels import rope

    kernels = {name: getattr(kern, name) for name in ("_fwd_kernel", "_bwd_preprocess_kernel", "_bwd_dkdv_kernel",
                                                      "_bwd_dq_kernel")}
    kernels["rotary_table_kernel"] = rope.rotary_table_kernel
    out = {}
    for name, fn in kernels.items():
        out[name] = sorted(fn.arg_names[i] if isinstance(i, int) else i for i in fn.do_not_specialize)
    return out


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run without TRITON_INTERPRET (the check compiles, it does not interpret)")
    print(json.dumps({"ttir": survey(), "do_not_specialize": specialisation_lists()}))
