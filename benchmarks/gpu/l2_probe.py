"""The memory ceilings the kernel's design depends on, one row each in probes.jsonl:

  hbm-read     a Triton kernel that streams a 2 GiB buffer (many times the L2) twice: HBM -> SM bytes/s
  l2-read      the same kernel over a buffer of a quarter of the L2, many passes: L2 -> SM bytes/s (loads with
               .cg, cached in L2 only, so the L1 does not serve them)
  copy         torch's device-to-device copy of 1 GiB (bytes read + written), the figure KINDS.md quotes
  matmul-8192  bf16 torch.matmul 8192^3 on random data: the tensor-core ceiling the kernel is held against

benchmarks/NOTES.md estimates that a 64x256 tile needs about 15 TB/s from L2 at the bare matmul's rate at the
Llama 3 shape (12 TB/s for 128x128): l2-read says whether the H200's L2 delivers that. Times are medians of CUDA
events after a warm-up; the buffers are random (never zeros). --dry-run: the interpreter, kilobytes.
"""

from __future__ import annotations

import checklib as ck
import torch

_KERNEL = []


def read_kernel():
    """The probe kernel, defined on first use: triton is imported after setup() chose the interpreter or not."""
    if not _KERNEL:
        import triton
        import triton.language as tl

        @triton.jit
        def _read_kernel(x_ptr, out_ptr, n, passes, BLOCK: tl.constexpr):
            """Each program sums a strided share of x, ``passes`` times; one float per program is written."""
            pid = tl.program_id(0)
            nprog = tl.num_programs(0)
            acc = tl.zeros([BLOCK], tl.float32)
            for _ in range(passes):
                for start in range(pid * BLOCK, n, nprog * BLOCK):
                    offs = start + tl.arange(0, BLOCK)
                    acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + pid, tl.sum(acc, axis=0))

        _KERNEL.append(_read_kernel)
    return _KERNEL[0]


def read_probe(ctx, n_elems, passes, programs, block):
    kernel = read_kernel()
    x = torch.rand(n_elems, device=ctx.device)
    out = torch.empty(programs, device=ctx.device)

    def run():
        kernel[(programs,)](x, out, n_elems, passes, BLOCK=block, num_warps=8)

    timing = ck.measure(ctx, lambda: run(), (), reps=3 if ctx.dry else 7, warmup=1 if ctx.dry else 2)
    total = float(out.double().sum())
    expect = float(x.double().sum()) * passes
    assert abs(total - expect) <= 1e-3 * abs(expect) + 1.0, f"sum {total} != {expect}: the kernel skipped data"
    moved = 4 * n_elems * passes
    return dict(bytes=moved, buffer_mib=round(4 * n_elems / 2**20, 3), passes=passes, programs=programs,
                tb_per_s=round(moved / (timing["ms_median"] * 1e-3) / 1e12, 3), **timing)


def main(argv=None):
    ctx = ck.setup("l2", "probes.jsonl", __doc__.split("\n\n")[0], default_item_cap=20.0, argv=argv)
    ctx.items.plan(["hbm-read", "l2-read", "copy", "matmul-8192"])
    if ctx.cuda:
        props = torch.cuda.get_device_properties(0)
        sms, l2 = props.multi_processor_count, getattr(props, "L2_cache_size", 50 * 2**20)
    else:
        sms, l2 = 2, 4 * 2**20
    block = 2048
    if ctx.dry:
        hbm, l2_elems, l2_passes = 1 << 16, 1 << 12, 4
    else:
        hbm = 1 << 29  # 2 GiB of fp32
        l2_elems = (l2 // 4) // 4  # a quarter of the L2, in fp32
        l2_passes = max(1, (32 << 30) // (4 * l2_elems))  # about 32 GiB served in all
    programs = sms * 4
    info = {"sms": sms, "l2_mib": round(l2 / 2**20, 1)}
    ctx.items.run("hbm-read", lambda: read_probe(ctx, hbm, 1 if ctx.dry else 2, programs, block), **info)
    ctx.items.run("l2-read", lambda: read_probe(ctx, l2_elems, l2_passes, programs, block), **info)

    def copy():
        n = (1 << 28) if ctx.cuda else (1 << 16)
        src = torch.rand(n, device=ctx.device)
        dst = torch.empty_like(src)
        timing = ck.measure(ctx, lambda: dst.copy_(src), (), reps=3 if ctx.dry else 7, warmup=2)
        moved = 2 * 4 * n
        return dict(bytes=moved, tb_per_s=round(moved / (timing["ms_median"] * 1e-3) / 1e12, 3), **timing)

    def matmul():
        size = 8192 if ctx.cuda else 256
        a = torch.randn(size, size, device=ctx.device).to(torch.bfloat16)
        b = torch.randn(size, size, device=ctx.device).to(torch.bfloat16)
        timing = ck.measure(ctx, lambda: torch.matmul(a, b), (), reps=3 if ctx.dry else 10, warmup=3)
        return dict(size=size, tflops=round(2 * size**3 / (timing["ms_median"] * 1e-3) / 1e12, 2), **timing)

    ctx.items.run("copy", copy)
    ctx.items.run("matmul-8192", matmul)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
