"""Ahead-of-time compilation of the Triton SSD scan for the TensorRT AOT plugin (no TensorRT needed).

TensorRT's AOT launcher calls the kernel with (input pointers, extra int32 scalars, output
pointers), the order of ``ssd_scan_kernel``'s parameters. Triton >= 3.3 appends hidden parameters
(``global_scratch``, and ``profile_scratch`` from 3.5) that TensorRT does not pass; our kernel never
reads them, so :func:`strip_unused_params` removes them from the PTX entry (and refuses if one is
read), leaving exactly the parameters TensorRT supplies.

Shape-dependent launch choices (block sizes, grid) come from :mod:`engines.kernels.ssd_triton`, so
the JIT path, the AOT path and the torch engine launch the same kernel the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TRITON_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
POINTERS = {"x_ptr": "x", "B_ptr": "x", "C_ptr": "x", "dt_ptr": "fp32", "A_ptr": "fp32", "s0_ptr": "fp32",
            "y_ptr": "fp32", "sf_ptr": "fp32"}


# Above 48 KiB a kernel needs cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES) before launch, which
# TensorRT's AOT launcher is not documented to do: pick the longest chunk that fits under it.
MAX_STATIC_SHARED = 48 * 1024


@dataclass(frozen=True)
class CompiledScan:
    name: str  # kernel entry name in the PTX
    ptx: str
    num_warps: int
    shared: int  # dynamic shared memory bytes
    block_l: int
    block_p: int
    block_n: int
    n_params: int  # parameters TensorRT passes (inputs + scalars + outputs)


def strip_unused_params(ptx: str, name: str, keep: int) -> str:
    """Drop the entry's parameters after the first ``keep`` when the body never reads them."""
    m = re.search(r"\.entry\s+" + re.escape(name) + r"\s*\((.*?)\)", ptx, flags=re.S)
    if m is None:
        raise ValueError(f"no .entry {name} in the PTX")
    decls = [d.strip() for d in m.group(1).split(",") if d.strip()]
    if len(decls) < keep:
        raise ValueError(f"kernel {name} has {len(decls)} parameters, fewer than the {keep} TensorRT passes")
    body = ptx[m.end():]
    for d in decls[keep:]:
        pname = d.split()[-1]
        if re.search(r"\b" + re.escape(pname) + r"\b", body):
            raise ValueError(f"kernel {name} reads hidden parameter {pname}; TensorRT would not pass it")
    params = ",\n\t".join(decls[:keep])
    return ptx[:m.start(1)] + "\n\t" + params + "\n" + ptx[m.end(1):]


def scan_signature(dtype: str) -> dict:
    from engines.kernels.ssd_triton import ssd_scan_kernel

    t = TRITON_TYPES[dtype]
    sig = {}
    for arg in ssd_scan_kernel.arg_names:
        if arg in POINTERS:
            sig[arg] = "*" + (t if POINTERS[arg] == "x" else POINTERS[arg])
        elif arg.isupper() or arg.startswith("BLOCK_"):
            sig[arg] = "constexpr"
        else:
            sig[arg] = "i32"
    return sig


def compile_scan(dtype: str, headdim: int, dstate: int, chunk_size: int, head_order: str,
                 target=None) -> CompiledScan:
    """Compile ``ssd_scan_kernel`` to PTX for inputs of ``dtype`` (float32 | float16 | bfloat16).

    ``target``: a ``triton.backends.compiler.GPUTarget``; default the current GPU. Compiling for an
    explicit target works without a GPU (tests do this).
    """
    import triton

    from engines.kernels import ssd_triton as K

    bp, bn = K.block_p(headdim), K.block_n(dstate)
    for bl in sorted({K.block_l(chunk_size), 32, 16}, reverse=True):
        if bl > K.block_l(chunk_size):
            continue
        warps = K.num_warps(bl, bp, bn)
        constexprs = dict(HAS_INIT=True, RANK_MAJOR=head_order == "rank_major", DOT=K.DOT_IEEE if dtype == "float32" else K.DOT_TF32,
                          BLOCK_L=bl, BLOCK_P=bp, BLOCK_N=bn)
        src = triton.compiler.ASTSource(fn=K.ssd_scan_kernel, signature=scan_signature(dtype),
                                        constexprs=constexprs)
        kwargs = {"options": {"num_warps": warps}}
        if target is not None:
            kwargs["target"] = target
        ck = triton.compile(src, **kwargs)
        if ck.metadata.shared <= MAX_STATIC_SHARED:  # launchable without a shared-memory opt-in
            break
    n_params = sum(1 for v in scan_signature(dtype).values() if v != "constexpr")
    name = ck.metadata.name
    ptx = strip_unused_params(ck.asm["ptx"], name, n_params)
    return CompiledScan(name, ptx, ck.metadata.num_warps, ck.metadata.shared, constexprs["BLOCK_L"], bp, bn, n_params)
