"""torch's own int4 and int8 CPU kernels over the one copy of a nested family's int4 / int8 weights.

int8 (:class:`PackedInt8`): ``torch.ops.aten._weight_int8pack_mm`` multiplies bf16 activations by
int8 weights [N, K] with one bf16 scale per output row. Our int8 scales are per row *and block* of
``b`` columns, so the family tensor is kept block by block (``K / b`` tensors [N, b], one copy of the
codes), and a budget's product is one kernel call per block it spans, summed in float32: its rows are
a row range of every block, its columns whole blocks. Measured, one 3868 x 896 tensor, one token, one
thread: 0.27 ms against 0.59 ms for a float32 matmul and 15 ms for the dequantize-and-matmul path.
Inputs of more than INT8_MAX_ROWS tokens (prompts) are multiplied in float32 by the view dequantized
from this copy (exactly quant.dequantize's values), since there one GEMM beats a call per block.

int4 (:class:`PackedInt4`):

``torch.ops.aten._weight_int4pack_mm_for_cpu`` multiplies bf16 activations by int4 weights in its
own tile layout, dequantizing tiles in registers (no float copy of a weight, ever): decode reads half
a byte per weight and prefill runs at about the speed of a float32 GEMM. The layout keeps a nested
family's prefix rule: rows go in tiles of ``B`` (64 where the CPU has AVX-512, 32 with AVX2), each
tile ``[K, B/2]`` bytes with row ``r`` in the low nibble and row ``r + B/2`` in the high one, so

- a budget's rows ``[r0, r0 + n)`` are the tiles that cover them (whole tiles computed, the rows
  outside dropped from the output: at most two tiles' rows of extra work);
- a budget's columns ``[c0, c0 + k)`` are a contiguous run inside every tile, so the packed tensor
  is kept as column segments cut at every budget's column bounds (cut once, when a budget first
  uses them): each budget's matmul is one kernel call per segment it spans, on views, no copies.

:class:`PackedInt4` is one family tensor packed once, the first time a layer multiplies by it (rows
padded to whole tiles with zero weights); :func:`tile_rows` finds the layout by packing a probe and checking where rows land, so a
layout this module does not know disables the kernel instead of computing garbage. Precision: the
activations are rounded to bf16 on the way in and the outputs are bf16 (accumulated in float32),
and the scales are bf16 (the quantized weight ``code * scale`` then differs from the float32
dequantization by at most one bf16 rounding); :mod:`elastic_export.qmodel` falls back to its exact
dequantize-and-matmul path where the kernel does not apply (other formats, blocks below 16, 3-D
expert tensors, views that are not row runs of the family tensor) or where a user turns it off.
"""

from __future__ import annotations

import functools

import torch

GROUPS = (32, 64, 128, 256)  # the block sizes the kernel takes
PACK_ELEMS = 1 << 20  # codes converted at once while packing (4 MB of int32 in flight)


def _op(name: str):
    return getattr(torch.ops.aten, name, None)


@functools.lru_cache(maxsize=None)
def tile_rows() -> int | None:
    """Rows per tile of torch's int4 CPU layout on this machine, or None where the kernel is missing
    or its layout is not the one described in the module docstring."""
    pack, mm = _op("_convert_weight_to_int4pack_for_cpu"), _op("_weight_int4pack_mm_for_cpu")
    if pack is None or mm is None:
        return None
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=g)
    try:
        got = pack(q, 1)
    except RuntimeError:
        return None
    for rows in (64, 32, 16):
        t = q.view(128 // rows, rows, 64).transpose(1, 2)  # [tiles, K, rows]
        want = (t[..., :rows // 2] | (t[..., rows // 2:] << 4)).to(torch.uint8).reshape(128, 32)
        if tuple(got.shape) == (128, 32) and torch.equal(got, want):
            return rows
    return None


def available() -> bool:
    return tile_rows() is not None


def fits(qw) -> bool:
    """Whether a QWeight can take the kernel: int4, 2-D, a block the kernel takes."""
    return bool(qw.packed and qw.codes.dim() == 2 and (qw.block in GROUPS or qw.block == 16 and
                                                         qw.codes.shape[-1] % 16 == 0) and available())


def _pack(codes: torch.Tensor, rows: int, n_pad: int) -> torch.Tensor:
    """Packed int4 codes [N, K/2] (quant.pack_int4's order) -> the kernel's tiles [n_pad / rows, K, rows / 2],
    padding rows holding code 0; converted a few rows at a time."""
    pack = _op("_convert_weight_to_int4pack_for_cpu")
    N, half = codes.shape
    K = 2 * half
    tiles = torch.empty(n_pad // rows, K, rows // 2, dtype=torch.uint8)
    flat = tiles.view(-1)
    step = max(rows, PACK_ELEMS // K // rows * rows)
    for r in range(0, n_pad, step):
        e = min(r + step, n_pad)
        q = torch.full((e - r, K), 8, dtype=torch.int32)  # nibble 8: code 0
        c = codes[r:min(e, N)]
        q[:c.shape[0], 0::2] = c & 0x0F  # even column in the low nibble
        q[:c.shape[0], 1::2] = c >> 4
        flat[r * K // 2:e * K // 2] = pack(q, 1).view(-1)
    return tiles


def _run(view: torch.Tensor, N: int, K: int, g: int) -> tuple[int, int, int, int] | None:
    """(r0, n, c0, k) of a meta view [n, k] of a family tensor [N, K] that is rows [r0, r0 + n) and
    columns [c0, c0 + k) with whole groups of ``g`` columns, or None for any other view."""
    if view.dim() != 2:
        return None
    n, k = view.shape
    r0, c0 = divmod(view.storage_offset(), K)
    if (n > 1 and view.stride(0) != K) or (k > 1 and view.stride(1) != 1) or c0 % g or k % g or \
            c0 + k > K or r0 + n > N or n == 0:
        return None
    return r0, n, c0, k


class PackedInt4:
    """One int4 family tensor [N, K] in the kernel's layout. ``parts``: a block of 32 or more is one
    part; a block of 16 (the kernel's smallest group is 32) is two, the even and the odd 16-column
    blocks each with the other's codes set to 0, so that their sum is the tensor exactly (two kernel
    calls, twice the bytes, for these tensors only). Each part is a list of column segments ``(c0, c1,
    tiles, scales)``: columns [c0, c1) as uint8 tiles [N_pad / B, c1 - c0, B / 2] and bf16 scales
    [(c1 - c0) / g, N_pad, 2] (scale, zero = 0). One segment at first; a budget whose column range
    ends inside a segment splits it there (the K axis of a tile is contiguous, so the halves are
    plain copies of their bytes and the total stays one copy): every budget's columns are whole
    segments and no call copies weights. See the module docstring."""

    def __init__(self, qw):
        B = tile_rows()
        if B is None or not fits(qw):
            raise ValueError("this tensor or this machine has no int4 kernel")
        N, half = qw.codes.shape
        K, b = 2 * half, qw.block
        self.N, self.K, self.rows = N, K, B
        self.group = max(b, GROUPS[0])
        n_pad = -(-N // B) * B
        if b >= GROUPS[0]:
            halves = [(qw.codes, qw.scales)]
        else:  # block 16: [even 16-blocks | zeros] and [zeros | odd 16-blocks] in every group of 32
            blocks = qw.codes.view(N, K // 32, 2, 8)
            zero = torch.tensor(0x88, dtype=torch.uint8)
            halves = [(torch.stack([blocks[:, :, 0], zero.expand(N, K // 32, 8)], 2).view(N, half), qw.scales[:, 0::2]),
                      (torch.stack([zero.expand(N, K // 32, 8), blocks[:, :, 1]], 2).view(N, half), qw.scales[:, 1::2])]
        self.parts = []
        for codes, sc in halves:
            scales = torch.zeros(K // self.group, n_pad, 2, dtype=torch.bfloat16)
            scales[:, :N, 0] = sc.t()
            self.parts.append([(0, K, _pack(codes, B, n_pad), scales)])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() + 2 * s.numel() for part in self.parts for _, _, t, s in part)

    def _split(self, part: list, at: int) -> None:
        for i, (c0, c1, tiles, scales) in enumerate(part):
            if c0 < at < c1:
                a, g = at - c0, self.group
                part[i:i + 1] = [(c0, at, tiles[:, :a].contiguous(), scales[:a // g].clone()),
                                 (at, c1, tiles[:, a:].contiguous(), scales[a // g:].clone())]
                return

    def linear(self, x: torch.Tensor, view: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
        """``F.linear(x, W, bias)`` for the weights W that a (meta) view of the family tensor stands
        for, or None where the view is not a run of whole rows and whole groups of columns."""
        K, g, B = self.K, self.group, self.rows
        run = _run(view, self.N, K, g)
        if run is None:
            return None
        r0, n, c0, k = run
        b0, b1 = r0 // B, -(-(r0 + n) // B)
        mm = _op("_weight_int4pack_mm_for_cpu")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, k)
        x2 = x2.to(torch.bfloat16) if x2.dtype != torch.bfloat16 else x2
        y = None
        for part in self.parts:
            self._split(part, c0)
            self._split(part, c0 + k)
            for s0, s1, tiles, scales in part:
                if s0 < c0 or s1 > c0 + k:
                    continue
                sc = scales[:, b0 * B:b1 * B]
                xs = x2 if s1 - s0 == k else x2[:, s0 - c0:s1 - c0]
                out = mm(xs.contiguous(), tiles[b0:b1].view((b1 - b0) * B, (s1 - s0) // 2), g,
                         sc if sc.is_contiguous() else sc.contiguous())
                y = out.float() if y is None else y.add_(out)
        lo = r0 - b0 * B
        if lo or y.shape[1] != n:
            y = y[:, lo:lo + n]
        y = y.to(x.dtype).reshape(*lead, n)
        return y if bias is None else y + bias


def int8_available() -> bool:
    return _op("_weight_int8pack_mm") is not None


INT8_MIN_BLOCK = 16  # one call per block: small blocks cost calls, still far less than dequantizing
INT8_MAX_ROWS = 16  # activations rows (tokens) the int8 kernel takes: decode; a prompt dequantizes instead


def fits_int8(qw) -> bool:
    """Whether a QWeight can take the int8 kernel: int8 codes, 2-D, blocks of INT8_MIN_BLOCK or more."""
    return bool(not qw.packed and qw.codes.dtype == torch.int8 and qw.codes.dim() == 2 and
                qw.block >= INT8_MIN_BLOCK and int8_available())


class PackedInt8:
    """One int8 family tensor [N, K] as its column blocks: ``blocks[j]`` int8 [N, b] (contiguous: a
    budget's rows are a row range of it) and ``scales[j]`` bf16 [N]. Made once, the first time a layer
    multiplies by the tensor; the same interface as :class:`PackedInt4`."""

    def __init__(self, qw):
        if not fits_int8(qw):
            raise ValueError("this tensor or this torch has no int8 kernel")
        N, K = qw.codes.shape
        b = qw.block
        self.N, self.K, self.group = N, K, b
        self.blocks = [qw.codes[:, j * b:(j + 1) * b].contiguous() for j in range(K // b)]
        self.scales32 = qw.scales.t().float().contiguous()  # [K / b, N]: the exact path's
        self.scales = self.scales32.to(torch.bfloat16)  # the kernel's

    @property
    def nbytes(self) -> int:
        return sum(t.numel() for t in self.blocks) + 6 * self.scales.numel()

    def _dense(self, r0: int, n: int, j0: int, j1: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows [r0, r0 + n) of blocks [j0, j1) dequantized (codes * float32 scale, as
        quant.dequantize), from this copy: the file's codes are not read again."""
        b = self.group
        w = torch.empty(n, j1 - j0, b, dtype=torch.float32)
        for j in range(j0, j1):  # each block straight into its columns: no per-block temporaries
            torch.mul(self.blocks[j][r0:r0 + n], self.scales32[j, r0:r0 + n, None], out=w[:, j - j0])
        w = w.view(n, -1)
        return w if dtype == torch.float32 else w.to(dtype)

    def linear(self, x: torch.Tensor, view: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
        """``F.linear(x, W, bias)`` for the weights W that a (meta) view of the family tensor stands
        for, or None where the view is not a run of whole rows and whole blocks of columns."""
        b = self.group
        run = _run(view, self.N, self.K, b)
        if run is None:
            return None
        r0, n, c0, k = run
        mm = _op("_weight_int8pack_mm")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, k)
        if x2.shape[0] > INT8_MAX_ROWS:  # a prompt: the kernel's per-block calls lose to one dense GEMM
            y = torch.nn.functional.linear(x2, self._dense(r0, n, c0 // b, (c0 + k) // b, x2.dtype))
            y = y.reshape(*lead, n)
            return y if bias is None else y + bias
        x2 = x2.to(torch.bfloat16) if x2.dtype != torch.bfloat16 else x2
        y = None
        for j in range(c0 // b, (c0 + k) // b):
            xs = x2[:, j * b - c0:(j + 1) * b - c0].contiguous()
            out = mm(xs, self.blocks[j][r0:r0 + n], self.scales[j, r0:r0 + n])
            y = out.float() if y is None else y.add_(out)
        y = y.to(x.dtype).reshape(*lead, n)
        return y if bias is None else y + bias
