"""Triton backend: one fused pass over ``hidden x weight^T`` with an online logsumexp.

Work is split into (row block, vocabulary split) programs. Each program walks its split of the
vocabulary in tiles of BLOCK_N columns; for each tile it accumulates ``hidden[rows] @ weight[cols]^T``
in fp32 over D, applies bias and softcap to the tile, picks up the target logits, and folds the tile
into a running (max, sum, entropy sum) per row, in base 2 with ``log2(e) / alpha`` folded into one
scale; with ``return_logit_sum`` also the running sum of the tile's logits (after bias and softcap, before the
1/alpha scale; a fifth partial plane, WITH_SUM constexpr, so nothing changes when off). The partials of every split
go to a small fp32 buffer ``[4 (5), num_splits, N]`` that a second kernel merges in split order: deterministic, no atomics. The split size depends on the vocabulary
only, never on N, so a row's bits do not depend on the batch; small N still fills the GPU through the
splits.

Launch order (L2 reuse): the grid is one-dimensional and program ids are grouped: GROUP_M row blocks
form a group, and within a group the row block varies fastest, then the split. With GROUP_M = 1 the
split varies fastest, so the programs resident at one time share a few hidden blocks (re-read for
every vocabulary tile, they stay in L2) and stream the head's tiles once per group of row blocks.
``benchmarks/l2_model.py`` models the HBM traffic of each order; ``benchmarks/NOTES.md`` says why the
defaults are what they are.

Under ``TRITON_INTERPRET=1`` the same source runs on CPU tensors; there tiles are upcast to fp32
(the interpreter's bf16 ``tl.dot`` is wrong) and one small fixed config is used.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch

try:
    import triton
    import triton.language as tl

    IMPORT_ERROR = None
except Exception as exc:  # ImportError, or a broken install
    triton = None
    tl = None
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
STATS = 4  # per split and row: max, sum, entropy sum (base 2, relative to max), target logit
SUM_PLANE = 4  # with return_logit_sum: a fifth plane, the split's sum of logits


def triton_interpreting() -> bool:
    """True when Triton kernels run under its CPU interpreter (set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class KernelConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    split_tiles: int  # vocabulary tiles per split: split size = split_tiles * block_n
    num_warps: int
    num_stages: int
    group_m: int = 1  # row blocks per launch group; 1: the split varies fastest (see the module docstring)
    maxnreg: Optional[int] = None  # register cap per thread (e.g. 128: two blocks per SM), None: the compiler's
    flatten: bool = False  # one flattened (tile, k) loop, so loads of the next tile overlap the epilogue
    # Interpreter only: products summed over K in index order instead of tl.dot, whose numpy/BLAS
    # version gives a row different bits at different positions in a tile. Tests also run tl.dot there.
    broadcast_dot: bool = False
    # A timing probe, never a result: the same loads and tl.dot, but the epilogue is one max per tile (see
    # GPU_CANDIDATES["mainloop"]); kernel_config never returns it, so soft_values cannot reach it.
    mainloop_only: bool = False
    # Operands through TMA tensor descriptors (host TensorDescriptor; Hopper's bulk tensor copies) instead of
    # pointer loads. Needs a unit K stride and 16-byte aligned rows (D * itemsize % 16 == 0); Triton >= 3.6.
    tma: bool = False
    # tl.range(..., warp_specialize=True) over the vocabulary tiles: a producer warp issues the loads and the
    # consumer warpgroups run wgmma and the epilogue, so one tile's epilogue overlaps the next tile's loads.
    warp_specialize: bool = False

    @property
    def split_size(self) -> int:
        return self.split_tiles * self.block_n


# Launch configs that the GPU check compiles and times side by side (benchmarks/gpu_check.sh); "default"
# is what kernel_config returns for half inputs on CUDA. Each compiles for sm_90 with no spills
# (benchmarks/triton_compile.py, a CI step); benchmarks/NOTES.md has their registers, shared memory and the L2
# model's traffic, and why 64 x 256 is the default (128 x 128 spills with bias + softcap + entropy; larger
# tiles spill hundreds of bytes without warp specialization).
GPU_CANDIDATES = {
    "default": KernelConfig(64, 256, 64, 32, 8, 3, group_m=32),
    "split-fastest": KernelConfig(64, 256, 64, 32, 8, 3, group_m=1),
    "group8": KernelConfig(64, 256, 64, 32, 8, 3, group_m=8),
    "rows-fastest": KernelConfig(64, 256, 64, 32, 8, 3, group_m=1 << 30),
    "stages4": KernelConfig(64, 256, 64, 32, 8, 4, group_m=32),
    "flatten": KernelConfig(64, 256, 64, 32, 8, 3, group_m=32, flatten=True),
    "128x128": KernelConfig(128, 128, 64, 64, 8, 3, group_m=8),  # the tile before, in the new order
    "2-per-sm": KernelConfig(64, 128, 64, 64, 4, 3, group_m=32),  # 128 threads x 255 registers x 2 fit
    # TMA operands + warp specialization at 128 rows: a producer warpgroup issues the TMA loads and two consumer
    # warpgroups (64 rows each) run wgmma and the epilogue, trading registers with setmaxnreg (40 / 232). Triton
    # (3.6 to 3.9) warp-specializes a Hopper loop only with num_warps = 4 and descriptors made in the kernel.
    # The same 8192-column splits; group 16 keeps the default's 2048 rows per launch group.
    "tma-ws-128x128": KernelConfig(128, 128, 64, 64, 4, 3, group_m=16, tma=True, warp_specialize=True),
    # Timing probe, NOT soft values: the default tile's loads and tl.dot with the epilogue cut to one max per
    # tile, so (its time) - (the default's) is the exposed epilogue. Its value is alpha * logsumexp over splits of
    # (split's max raw logit) / alpha; kernel_config never returns it (tests/ops/test_triton_kernel.py).
    "mainloop": KernelConfig(64, 256, 64, 32, 8, 3, group_m=32, mainloop_only=True),
}


def kernel_config(device: torch.device, dtype: torch.dtype, wide_loads: bool = True) -> KernelConfig:
    """One fixed config per device kind, dtype and operand layout; never a function of N (row independence)."""
    if device.type == "cpu":  # interpreter: small tiles keep numpy fast and exercise every mask
        return KernelConfig(16, 32, 16, 8, 1, 1, broadcast_dot=True)
    if not wide_loads:
        # D or a row stride not a multiple of 16, or a K stride other than 1 (a transposed head): the loads can be
        # neither 16-byte vectors nor cp.async, so the software pipeline holds them in registers and the default
        # tiles spill (64x256: 432-440 B of stack in bf16 on sm_90). Smaller tiles, fewer stages, no spills on sm_80
        # or sm_90 with Triton 3.6 and 3.9 (benchmarks/NOTES.md). Padding D instead would copy the head (V x D).
        if dtype == torch.float32:
            return KernelConfig(64, 128, 16, 64, 8, 1)
        return KernelConfig(64, 128, 32, 64, 8, 2)
    if dtype == torch.float32:
        return KernelConfig(64, 128, 32, 64, 8, 3)  # ieee fp32 (or tf32) dot: no spills on sm_80 or sm_90
    return GPU_CANDIDATES["default"]


if triton is not None:
    @triton.jit
    def _tanh(x):
        # tanh from exp2 of a non-positive argument: no overflow, exact sign.
        e = tl.exp2(tl.abs(x) * -2.8853900817779268)  # 2^(-2|x| log2 e) = e^(-2|x|)
        t = tl.fdiv(1.0 - e, 1.0 + e, ieee_rounding=False)  # 2-ulp division: no IEEE slow path, fewer registers
        return tl.where(x < 0, -t, t)

    # Sizes other than D are never specialized: Triton's JIT turns an integer argument equal to 1 into a
    # constant (the kernels do int64 arithmetic on them) and compiles another kernel for it, for no gain.
    # D and the strides stay specialized: a unit stride, and D and strides divisible by 16, give the wide,
    # aligned loads that the software pipeline (cp.async wgmma operands) needs; operands without them get the
    # narrow-load config (kernel_config(wide_loads=False)).
    @triton.jit(do_not_specialize=["n_rows", "vocab", "num_splits", "split_size", "group_m"])
    def _soft_values_split_kernel(
        hidden_ptr, weight_ptr, bias_ptr, targets_ptr, partial_ptr,
        n_rows, vocab, dim,
        stride_hn, stride_hd, stride_wv, stride_wd,
        num_splits, split_size, group_m, scale, softcap,
        HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WITH_ENTROPY: tl.constexpr, WITH_SUM: tl.constexpr,
        UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BROADCAST_DOT: tl.constexpr, FLATTEN: tl.constexpr,
        H_K_UNIT: tl.constexpr, W_K_UNIT: tl.constexpr,
        TMA: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, MAINLOOP_ONLY: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # Grouped launch order: group_m row blocks per group, row block fastest within it, then the split.
        pid = tl.program_id(0)
        per_group = group_m * num_splits
        group = pid // per_group
        first_m = group * group_m
        group_size = tl.minimum(tl.cdiv(n_rows, BLOCK_M) - first_m, group_m)
        in_group = pid - group * per_group
        pid_m = first_m + in_group % group_size
        pid_s = in_group // group_size

        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        rows64 = rows.to(tl.int64)
        target = tl.load(targets_ptr + rows64, mask=row_ok, other=-1)

        run_max = tl.full([BLOCK_M], -3.0e38, tl.float32)  # finite: 0 * (start - max) stays 0
        run_sum = tl.zeros([BLOCK_M], tl.float32)
        run_ent = tl.zeros([BLOCK_M], tl.float32)
        target_logit = tl.zeros([BLOCK_M], tl.float32)
        run_lsum = tl.zeros([BLOCK_M], tl.float32)  # sum of z over the split (WITH_SUM)

        if TMA:  # device-side descriptors: Triton warp-specializes a Hopper loop only with these, not host ones
            h_desc = tl.make_tensor_descriptor(hidden_ptr, shape=[n_rows, dim], strides=[stride_hn, 1],
                                               block_shape=[BLOCK_M, BLOCK_K])
            w_desc = tl.make_tensor_descriptor(weight_ptr, shape=[vocab, dim], strides=[stride_wv, 1],
                                               block_shape=[BLOCK_N, BLOCK_K])

        v_start = pid_s * split_size
        v_end = tl.minimum(v_start + split_size, vocab)
        for v0 in tl.range(v_start, v_end, BLOCK_N, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE):
            cols = v0 + tl.arange(0, BLOCK_N)
            col_ok = cols < v_end
            cols64 = cols.to(tl.int64)
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for k0 in range(0, dim, BLOCK_K):
                if TMA:  # out-of-bounds rows, columns and K read as 0
                    h = h_desc.load([pid_m * BLOCK_M, k0])
                    w = w_desc.load([v0, k0]).T
                else:
                    h, w = _load_tiles(hidden_ptr, weight_ptr, rows64, row_ok, cols64, col_ok, k0, dim,
                                       stride_hn, stride_hd, stride_wv, stride_wd, H_K_UNIT, W_K_UNIT, BLOCK_K)
                if UPCAST:
                    h = h.to(tl.float32)
                    w = w.to(tl.float32)
                if BROADCAST_DOT:
                    acc += tl.sum(h[:, :, None] * w[None, :, :], axis=1)
                else:
                    acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)

            if MAINLOOP_ONLY:  # the timing probe: one max per tile, nothing else
                run_max = tl.maximum(run_max, tl.max(acc, axis=1))
            else:
                run_max, run_sum, run_ent, target_logit, run_lsum = _fold_tile(
                    acc, cols, cols64, col_ok, target, bias_ptr, scale, softcap, run_max, run_sum, run_ent,
                    target_logit, run_lsum, HAS_BIAS, HAS_SOFTCAP, WITH_ENTROPY, WITH_SUM)

        if MAINLOOP_ONLY:
            run_max = run_max * scale
            run_sum += 1.0
        if WITH_SUM:
            # The rows again from scalars (a scalar base plus the lane's offset), so no row vector stays live across
            # the vocabulary loop beside the sum's: with both, the default tile spills one register.
            first_row = pid_m * BLOCK_M
            lane = tl.arange(0, BLOCK_M)
            row_ok = lane < n_rows - first_row
            out = partial_ptr + (pid_s.to(tl.int64) * n_rows + first_row) + lane
        else:
            out = partial_ptr + pid_s.to(tl.int64) * n_rows + rows64
        plane = num_splits.to(tl.int64) * n_rows
        tl.store(out, run_max, mask=row_ok)
        tl.store(out + plane, run_sum, mask=row_ok)
        tl.store(out + 2 * plane, run_ent, mask=row_ok)
        tl.store(out + 3 * plane, target_logit, mask=row_ok)
        if WITH_SUM:
            tl.store(out + 4 * plane, run_lsum, mask=row_ok)

    @triton.jit
    def _load_tiles(hidden_ptr, weight_ptr, rows64, row_ok, cols64, col_ok, k0, dim,
                    stride_hn, stride_hd, stride_wv, stride_wd,
                    H_K_UNIT: tl.constexpr, W_K_UNIT: tl.constexpr, BLOCK_K: tl.constexpr):
        """Pointer loads of a [BLOCK_M, BLOCK_K] hidden tile and a [BLOCK_K, BLOCK_N] head tile, masked."""
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < dim
        # K offsets are 64-bit unless the K stride is 1: a transposed hidden or head (a W.t() view) has
        # (D-1) * stride past 2^31 at real sizes; a contiguous copy instead would allocate N x D or V x D.
        if H_K_UNIT:
            h_k = ks
        else:
            h_k = ks.to(tl.int64) * stride_hd
        if W_K_UNIT:
            w_k = ks
        else:
            w_k = ks.to(tl.int64) * stride_wd
        h = tl.load(
            hidden_ptr + rows64[:, None] * stride_hn + h_k[None, :],
            mask=row_ok[:, None] & k_ok[None, :], other=0.0,
        )
        w = tl.load(
            weight_ptr + cols64[None, :] * stride_wv + w_k[:, None],
            mask=col_ok[None, :] & k_ok[:, None], other=0.0,
        )
        return h, w

    @triton.jit
    def _fold_tile(acc, cols, cols64, col_ok, target, bias_ptr, scale, softcap, run_max, run_sum, run_ent,
                   target_logit, run_lsum, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                   WITH_ENTROPY: tl.constexpr, WITH_SUM: tl.constexpr):
        """The epilogue of one tile of logits: bias, softcap, target pick-up, online max / sum / entropy, and the
        sum of the logits (WITH_SUM)."""
        z = acc
        if HAS_BIAS:
            z += tl.load(bias_ptr + cols64, mask=col_ok, other=0.0)[None, :]
        if HAS_SOFTCAP:
            z = softcap * _tanh(z / softcap)

        hit = cols[None, :] == target[:, None]
        target_logit += tl.sum(tl.where(hit, z, 0.0), axis=1)

        # Base-2 logits over alpha. Columns past the split get a finite floor, not -inf: their p is 0 and
        # p * (u - max) stays 0 without a second mask (every tile has at least one real column).
        u = tl.where(col_ok[None, :], z * scale, -1.0e30)
        new_max = tl.maximum(run_max, tl.max(u, axis=1))
        shift = run_max - new_max
        rescale = tl.exp2(shift)
        u_shifted = u - new_max[:, None]
        p = tl.exp2(u_shifted)
        if WITH_ENTROPY:
            tile_ent = tl.sum(p * u_shifted, axis=1)
            run_ent = rescale * (run_ent + run_sum * shift) + tile_ent
        run_sum = run_sum * rescale + tl.sum(p, axis=1)
        if WITH_SUM:  # a column past the split loaded as 0 with a bias of 0, and softcap(0) = 0: it adds exactly 0
            run_lsum += tl.sum(z, axis=1)
        return new_max, run_sum, run_ent, target_logit, run_lsum

    @triton.jit(do_not_specialize=["n_rows", "num_splits"])
    def _merge_splits_kernel(
        partial_ptr, value_ptr, target_ptr, entropy_ptr, logit_sum_ptr,
        n_rows, num_splits, value_scale,  # value = alpha * ln(2) * (max + log2(sum))
        WITH_ENTROPY: tl.constexpr, WITH_SUM: tl.constexpr, BLOCK: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        row_ok = rows < n_rows
        rows64 = rows.to(tl.int64)
        n64 = n_rows.to(tl.int64)  # split s's partials start at s * n_rows: 64-bit, as num_splits * N may pass 2^31
        plane = num_splits.to(tl.int64) * n64

        total_max = tl.full([BLOCK], -3.0e38, tl.float32)
        for s in range(0, num_splits):
            total_max = tl.maximum(total_max, tl.load(partial_ptr + s * n64 + rows64, mask=row_ok, other=0.0))
        total_sum = tl.zeros([BLOCK], tl.float32)
        total_ent = tl.zeros([BLOCK], tl.float32)
        target_logit = tl.zeros([BLOCK], tl.float32)
        total_lsum = tl.zeros([BLOCK], tl.float32)
        for s in range(0, num_splits):
            at = partial_ptr + s * n64 + rows64
            split_max = tl.load(at, mask=row_ok, other=0.0)
            split_sum = tl.load(at + plane, mask=row_ok, other=1.0)
            shift = split_max - total_max
            rescale = tl.exp2(shift)
            total_sum += split_sum * rescale
            if WITH_ENTROPY:
                total_ent += rescale * (tl.load(at + 2 * plane, mask=row_ok, other=0.0) + split_sum * shift)
            target_logit += tl.load(at + 3 * plane, mask=row_ok, other=0.0)
            if WITH_SUM:
                total_lsum += tl.load(at + 4 * plane, mask=row_ok, other=0.0)

        log2_sum = tl.log2(total_sum)
        tl.store(value_ptr + rows64, value_scale * (total_max + log2_sum), mask=row_ok)
        tl.store(target_ptr + rows64, target_logit, mask=row_ok)
        if WITH_ENTROPY:
            tl.store(entropy_ptr + rows64, (log2_sum - total_ent / total_sum) * 0.6931471805599453, mask=row_ok)
        if WITH_SUM:
            tl.store(logit_sum_ptr + rows64, total_lsum, mask=row_ok)


def aligned_operand(x: torch.Tensor) -> bool:
    """Whether Triton's JIT will see an operand whose tiles load as aligned 16-byte vectors (what it specializes:
    unit K stride, a row stride and D divisible by 16, a 16-byte aligned base)."""
    return (x.stride(1) == 1 and x.stride(0) % 16 == 0 and x.shape[1] % 16 == 0
            and (x.device.type == "meta" or x.data_ptr() % 16 == 0))


def launch_config(hidden: torch.Tensor, weight: torch.Tensor, logit_sum: bool = False) -> KernelConfig:
    """The config soft_values launches for these operands (a row slice keeps its batch's layout, so its config)."""
    cfg = kernel_config(hidden.device, hidden.dtype, aligned_operand(hidden) and aligned_operand(weight))
    if logit_sum and cfg == GPU_CANDIDATES["default"]:
        # The logit sum's loop-carried row vector takes the default tile past 255 registers on sm_90 with 3 stages
        # (Triton 3.9, bf16 or fp16 with no bias, softcap or entropy: the row offset, 4 B, spills across the
        # vocabulary loop); 2 stages (and the rows recomputed after the loop, in the kernel) fit with no spill on
        # sm_80 and sm_90 with Triton 3.6 and 3.9. The same tiles in the same order: the other outputs keep their bits.
        cfg = cfg._replace(num_stages=2)
    return cfg


def forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor],
    alpha: float,
    softcap: Optional[float],
    return_entropy: bool,
    config: Optional[KernelConfig] = None,
    return_logit_sum: bool = False,
):
    n, d = hidden.shape
    v = weight.shape[0]
    device = hidden.device
    interpreting = triton_interpreting()
    cfg = config or launch_config(hidden, weight, logit_sum=return_logit_sum)
    num_splits = triton.cdiv(v, cfg.split_size)
    row_blocks = triton.cdiv(n, cfg.block_m)

    with_sum = return_logit_sum and not cfg.mainloop_only  # the timing probe computes no sums
    partial = torch.empty((STATS + (1 if with_sum else 0), num_splits, n), dtype=torch.float32, device=device)
    if hidden.dtype == torch.float32 and not interpreting and torch.backends.cuda.matmul.allow_tf32:
        precision = "tf32"
    else:
        precision = "ieee"
    launch = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.maxnreg is not None and not interpreting:
        launch["maxnreg"] = cfg.maxnreg
    if cfg.tma:
        _check_tma_operands(hidden, weight)
    _soft_values_split_kernel[(row_blocks * num_splits,)](
        hidden, weight, bias if bias is not None else partial, targets, partial,
        n, v, d,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        num_splits, cfg.split_size, min(cfg.group_m, row_blocks), LOG2E / alpha, float(softcap or 1.0),
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, WITH_ENTROPY=return_entropy, WITH_SUM=with_sum,
        UPCAST=interpreting, DOT_PRECISION=precision, BROADCAST_DOT=cfg.broadcast_dot and interpreting,
        FLATTEN=cfg.flatten, H_K_UNIT=hidden.stride(1) == 1, W_K_UNIT=weight.stride(1) == 1,
        TMA=cfg.tma, WARP_SPECIALIZE=cfg.warp_specialize, MAINLOOP_ONLY=cfg.mainloop_only,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, **launch,
    )
    value = torch.empty(n, dtype=torch.float32, device=device)
    target_logit = torch.empty_like(value)
    entropy = torch.empty_like(value) if return_entropy else value
    logit_sum = torch.zeros_like(value) if return_logit_sum else value
    merge_block = 128
    _merge_splits_kernel[(triton.cdiv(n, merge_block),)](
        partial, value, target_logit, entropy, logit_sum, n, num_splits, alpha * LN2,
        WITH_ENTROPY=return_entropy, WITH_SUM=with_sum, BLOCK=merge_block,
    )
    if return_logit_sum:
        return value, target_logit, entropy if return_entropy else None, logit_sum
    return value, target_logit, entropy if return_entropy else None



def _check_tma_operands(hidden: torch.Tensor, weight: torch.Tensor) -> None:
    """TMA needs a unit K stride, and row strides and base addresses that are multiples of 16 bytes. A launch
    config with ``tma=True`` refuses other inputs: it is a candidate to time, not a path soft_values falls back from.
    Its descriptors are made in the kernel (128 bytes of global scratch per program, from Triton's allocator)."""
    for name, x in (("hidden", hidden), ("weight", weight)):
        size = x.element_size()
        if x.stride(1) != 1 or (x.stride(0) * size) % 16 or (x.device.type != "meta" and x.data_ptr() % 16):
            raise ValueError(
                f"a TMA launch config needs {name} with unit K stride and 16-byte aligned rows; got strides "
                f"{tuple(x.stride())} of {x.dtype} (D * {size} bytes must be a multiple of 16)"
            )
    if hidden.device.type == "cuda":
        from triton.runtime import _allocation

        if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):  # never replace the caller's own
            triton.set_allocator(_scratch)


def _scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")
