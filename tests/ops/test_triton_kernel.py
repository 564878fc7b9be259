"""The Triton kernel beyond the shared battery: 64-bit offsets, vocabulary splits, bitwise row independence, the
launch-config candidates (plain checks in tests/ops/kernel_checks.py, also runnable without pytest)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import kernel_checks
import pytest
import torch
from conftest import TEST_DEVICE

from endokern.ops import registry, triton_backend

ROOT = Path(__file__).resolve().parents[2]
CHECKS = Path(kernel_checks.__file__)
CUDA = TEST_DEVICE.type == "cuda"


def _needs_triton():
    reason = registry.unavailable_reason("triton", TEST_DEVICE)
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("operand", ["weight", "hidden"])
def test_transposed_operand_past_2_31_interpreter(operand):
    """A W.t() head (or transposed hidden) whose K offsets (D-1) * stride pass 2^31: 32-bit offsets wrapped to a
    negative address (the interpreter segfaulted). A fresh process, so a crash is a failure, not the end of pytest;
    its 4.4 GB buffer is only reserved (the OS commits the few pages written)."""
    if CUDA:
        pytest.skip("the CUDA run is test_transposed_operand_past_2_31_cuda")
    _needs_triton()
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(CHECKS), "--device", "cpu", f"transposed-{operand}"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)  # a hang, not slowness
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if lines and lines[0]["error"] and "can't allocate" in lines[0]["error"].lower():
        pytest.skip(f"this machine cannot reserve the 4.4 GB buffer: {lines[0]['error']}")
    assert proc.returncode == 0 and lines and lines[0]["ok"], (
        f"exit status {proc.returncode} (-11: segfault)\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )


@pytest.mark.gpu
@pytest.mark.parametrize("operand", ["weight", "hidden"])
def test_transposed_operand_past_2_31_cuda(gen, operand):
    kernel_checks.transposed_past_2_31(gen, TEST_DEVICE, operand)


def test_splits_against_oracle_interpreter(gen):
    """Three vocabulary splits (the last with a partial tile) with the interpreter's small config."""
    if CUDA:
        pytest.skip("the CUDA run is test_splits_against_oracle_cuda")
    _needs_triton()
    kernel_checks.splits_against_oracle(gen, TEST_DEVICE, torch.bfloat16, n=37, d=40)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [256, 200])  # 200: not a multiple of 16, another config
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_splits_against_oracle_cuda(gen, dtype, d):
    kernel_checks.splits_against_oracle(gen, TEST_DEVICE, dtype, d=d)


@pytest.mark.gpu
@pytest.mark.parametrize("config", kernel_checks.correct_candidates())
def test_candidates_against_oracle_cuda(gen, config):
    kernel_checks.splits_against_oracle(gen, TEST_DEVICE, torch.bfloat16, config, d=256)


@pytest.mark.gpu
@pytest.mark.parametrize("config", [None, *kernel_checks.correct_candidates()])
def test_row_alone_equals_row_in_large_batch_cuda(gen, config):
    kernel_checks.row_alone_bitwise(gen, TEST_DEVICE, torch.bfloat16, config)


@pytest.mark.parametrize("name", ["tma-ws-128x128", "default"])
def test_candidate_tiles_interpreter(gen, name):
    """A candidate's own tile (TMA descriptors made in the kernel, warp_specialize, which the interpreter ignores)
    under the interpreter, with 2-tile splits so three splits stay small; D = 72 is not a multiple of BLOCK_K."""
    if CUDA:
        pytest.skip("the CUDA runs are the *_cuda tests")
    _needs_triton()
    cfg = triton_backend.GPU_CANDIDATES[name]._replace(split_tiles=2)
    kernel_checks.splits_against_oracle(gen, TEST_DEVICE, torch.bfloat16, cfg, n=150, d=72)


def test_mainloop_probe_interpreter(gen):
    if CUDA:
        pytest.skip("the CUDA run is test_mainloop_probe_cuda")
    _needs_triton()
    cfg = triton_backend.GPU_CANDIDATES["mainloop"]._replace(split_tiles=2)
    kernel_checks.mainloop_probe(gen, TEST_DEVICE, torch.bfloat16, cfg)


@pytest.mark.gpu
def test_mainloop_probe_cuda(gen):
    kernel_checks.mainloop_probe(gen, TEST_DEVICE)


def test_tma_config_refuses_unaligned_rows():
    """TMA needs 16-byte rows: D = 36 in bf16 is 72 bytes. The candidate refuses instead of reading wrong rows."""
    _needs_triton()
    cfg = triton_backend.GPU_CANDIDATES["tma-ws-128x128"]
    hidden = torch.randn(5, 36, device=TEST_DEVICE).to(torch.bfloat16)
    weight = torch.randn(300, 36, device=TEST_DEVICE).to(torch.bfloat16)
    ids = torch.zeros(5, dtype=torch.int64, device=TEST_DEVICE)
    with pytest.raises(ValueError, match="16-byte aligned rows"):
        triton_backend.forward(hidden, weight, ids, bias=None, alpha=1.0, softcap=None, return_entropy=False,
                               config=cfg)
    with pytest.raises(ValueError, match="unit K stride"):
        triton_backend.forward(hidden, weight.t().contiguous().t(), ids, bias=None, alpha=1.0, softcap=None,
                               return_entropy=False, config=cfg)


def test_probes_are_unreachable_from_soft_values():
    """A timing probe (mainloop_only) is a GPU_CANDIDATES entry only: no device/dtype's config is one."""
    probes = [name for name, cfg in triton_backend.GPU_CANDIDATES.items() if cfg.mainloop_only]
    assert probes == ["mainloop"]
    for device in ("cpu", "cuda", "meta"):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            assert not triton_backend.kernel_config(torch.device(device), dtype).mainloop_only
    assert not triton_backend.GPU_CANDIDATES["default"].mainloop_only
