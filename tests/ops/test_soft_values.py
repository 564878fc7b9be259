"""One battery for every backend of ``soft_values`` against the float64 oracle (SPEC section 6)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import TEST_DEVICE, backend_params
from kernel_checks import assert_within
from oracle import logit_sums64, logits64, soft_values64, soft_values_in_dtype
from torch.utils._python_dispatch import TorchDispatchMode

import endokern

DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
]
BACKENDS = backend_params()
RTOL = 1e-5


def make_inputs(gen, n, d, v, dtype, *, case="normal", ignore_frac=0.2, with_bias=False, device=None):
    """Random, never-zero inputs. Cases: normal logits O(1..10), peaked softmaxes, |z| ~ 1e3."""
    hidden = torch.randn(n, d, generator=gen)
    weight = torch.randn(v, d, generator=gen) / math.sqrt(d)
    targets = torch.randint(0, v, (n,), generator=gen)
    if case == "normal":
        hidden *= 3.0
    elif case == "peaked":  # the target's weight row is a scaled copy of the row's hidden state
        weight[targets] = hidden * (4.0 / math.sqrt(d))
        hidden *= 2.0
    elif case == "large":  # |z| around 1e3
        hidden *= 1e3
    elif case == "tiny":  # |z| around 1e-3
        hidden *= 1e-3
    else:
        raise ValueError(case)
    ignored = torch.rand(n, generator=gen) < ignore_frac
    targets[ignored] = -100
    bias = torch.randn(v, generator=gen) * 2.0 if with_bias else None
    to = dict(device=device or TEST_DEVICE)
    return (
        hidden.to(dtype).to(**to),
        weight.to(dtype).to(**to),
        targets.to(**to),
        None if bias is None else bias.to(**to),
    )


def assert_close_to_oracle(result, hidden, weight, targets, *, alpha, bias, softcap, label=""):
    """fp32-level agreement with the float64 oracle on the same (possibly half) input values.

    Every backend accumulates exactly-upcast products in fp32, so half inputs meet the same bound.
    Relative error, with the row's logit scale max(1, max|z|) as the floor for values near zero.
    """
    ref_v, ref_t, ref_e = soft_values64(hidden, weight, targets, alpha=alpha, bias=bias, softcap=softcap)
    zmax = logits64(hidden, weight, bias, softcap).abs().amax(dim=1).clamp(min=1.0)
    v = weight.shape[0]
    checks = [
        ("value", result.value, ref_v, RTOL * torch.maximum(ref_v.abs(), zmax)),
        ("target_logit", result.target_logit, ref_t, RTOL * torch.fmax(ref_t.abs(), zmax)),
    ]
    if result.entropy is not None:
        scale = (zmax / alpha).clamp(min=1.0) * max(1.0, math.log(v))
        checks.append(("entropy", result.entropy, ref_e, RTOL * torch.maximum(ref_e.abs(), scale)))
    if getattr(result, "logit_sum", None) is not None:
        # fp32 error of a sum of V logits: bounded by a few hundred ulps (dot product over D, a blocked sum over V)
        # of the sum of the magnitudes it adds, logit_sums64's scale; 1e-5 of it is ~170 ulps.
        ref_s, scale = logit_sums64(hidden, weight, bias, softcap)
        checks.append(("logit_sum", result.logit_sum, ref_s, RTOL * scale))
    for name, got, ref, tol in checks:
        assert got.dtype == torch.float32, f"{label} {name}: {got.dtype}, not float32"  # fp32 whatever the input
        assert_within(f"{label} {name}", got, ref, tol)


SHAPES = [(37, 64, 1000), (130, 48, 777), (1, 32, 300), (9, 16, 2100)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,v", SHAPES, ids=lambda x: str(x))
def test_matches_oracle_shapes(gen, backend, dtype, n, d, v):
    hidden, weight, targets, _ = make_inputs(gen, n, d, v, dtype)
    out = endokern.soft_values(hidden, weight, targets, return_entropy=True, return_logit_sum=True, backend=backend)
    for t in out:
        assert t.dtype == torch.float32 and t.shape == (n,) and t.device == hidden.device
    assert_close_to_oracle(out, hidden, weight, targets, alpha=1.0, bias=None, softcap=None, label=backend)


CASES = [
    dict(case="normal", alpha=0.5, with_bias=True, softcap=None),
    dict(case="normal", alpha=2.0, with_bias=False, softcap=30.0),
    dict(case="peaked", alpha=1.0, with_bias=False, softcap=None),
    dict(case="peaked", alpha=0.5, with_bias=True, softcap=30.0),
    dict(case="large", alpha=1.0, with_bias=False, softcap=None),
    dict(case="large", alpha=2.0, with_bias=True, softcap=None),
    dict(case="large", alpha=0.5, with_bias=False, softcap=30.0),
    dict(case="tiny", alpha=2.0, with_bias=False, softcap=None),
    dict(case="tiny", alpha=0.5, with_bias=True, softcap=30.0),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("params", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_matches_oracle_cases(gen, backend, dtype, params):
    params = dict(params)
    alpha, softcap = params.pop("alpha"), params.pop("softcap")
    hidden, weight, targets, bias = make_inputs(gen, 45, 40, 613, dtype, **params)
    out = endokern.soft_values(
        hidden, weight, targets, alpha=alpha, bias=bias, softcap=softcap, return_entropy=True, backend=backend,
        return_logit_sum=True,
    )
    assert_close_to_oracle(out, hidden, weight, targets, alpha=alpha, bias=bias, softcap=softcap, label=backend)
    if params["case"] == "peaked" and softcap is None:  # really peaked: the target takes most of the mass
        ref_v, ref_t, _ = soft_values64(hidden, weight, targets, alpha=alpha, bias=bias)
        has = targets != -100
        logp = ((ref_t - ref_v) / alpha)[has]
        assert float(logp.median()) > -0.5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [DTYPES[1], DTYPES[2]])
def test_half_no_worse_than_torch_in_dtype(gen, backend, dtype):
    """The criterion of SPEC section 6 for half inputs: error no worse than PyTorch's own in that dtype."""
    hidden, weight, targets, bias = make_inputs(gen, 64, 96, 1500, dtype, with_bias=True)
    kwargs = dict(alpha=0.7, bias=bias, softcap=30.0)
    out = endokern.soft_values(hidden, weight, targets, return_entropy=True, backend=backend, **kwargs)
    own = soft_values_in_dtype(hidden.cpu(), weight.cpu(), targets.cpu(), **{**kwargs, "bias": bias.cpu()})
    ref = soft_values64(hidden.cpu(), weight.cpu(), targets.cpu(), **{**kwargs, "bias": bias.cpu()})
    for name, got, mine, truth in zip(("value", "target_logit", "entropy"), out, own, ref):
        has = ~torch.isnan(truth)
        err = (got.cpu().double() - truth)[has].abs().max()
        own_err = (mine.double() - truth)[has].abs().max()
        assert err <= 1.05 * own_err + 1e-5 * truth[has].abs().max(), f"{name}: {err} vs torch's own {own_err}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_targets_and_all_ignored(gen, backend):
    hidden, weight, _, _ = make_inputs(gen, 7, 24, 333, torch.float32)
    out = endokern.soft_values(hidden, weight, backend=backend)
    assert out.entropy is None and bool(torch.isnan(out.target_logit).all())
    ignored = torch.full((7,), 5, device=hidden.device)
    out2 = endokern.soft_values(hidden, weight, ignored, ignore_index=5, backend=backend)
    assert bool(torch.isnan(out2.target_logit).all())
    assert torch.equal(out.value, out2.value)
    assert_close_to_oracle(out, hidden, weight, None, alpha=1.0, bias=None, softcap=None, label=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic_and_row_independent(gen, backend, dtype):
    n = 130
    hidden, weight, targets, bias = make_inputs(gen, n, 48, 777, dtype, with_bias=True)
    kwargs = dict(alpha=0.8, bias=bias, softcap=30.0, return_entropy=True, return_logit_sum=True, backend=backend)
    first = endokern.soft_values(hidden, weight, targets, **kwargs)
    second = endokern.soft_values(hidden, weight, targets, **kwargs)
    for a, b in zip(first, second):
        assert torch.equal(a, b) or (torch.isnan(a).equal(torch.isnan(b)) and torch.equal(a.nan_to_num(), b.nan_to_num()))
    # A row alone, in a reordered batch, and in a sub-batch gives the same bits as in the full batch.
    perm = torch.randperm(n, generator=gen).to(hidden.device)
    shuffled = endokern.soft_values(hidden[perm], weight, targets[perm], **kwargs)
    rows = [0, 1, 17, 63, n - 1]
    for r in rows:
        alone = endokern.soft_values(hidden[r : r + 1], weight, targets[r : r + 1], **kwargs)
        for full, single in zip(first, alone):
            assert same_bits(full[r : r + 1], single), f"row {r} differs alone"
    for full, moved in zip(first, shuffled):
        assert same_bits(full[perm], moved), "rows differ after reordering the batch"


def same_bits(a, b):
    return torch.equal(a.nan_to_num(nan=1234.5), b.nan_to_num(nan=1234.5)) and torch.equal(a.isnan(), b.isnan())


class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any op creates (element count)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_never_allocates_n_by_v(gen, backend):
    """Every tensor PyTorch creates during the call (the torch backend's chunks, the buffers of the Triton and
    C++ launchers); the C++ kernel's own memory is measured by test_peak_memory_is_not_n_by_v."""
    n, d, v = 600, 4, 1500  # small D: the interpreter copies the weight as V * D * 4 bytes
    hidden, weight, targets, bias = make_inputs(gen, n, d, v, torch.float32, with_bias=True)
    with _LargestAllocation() as watch:
        endokern.soft_values(hidden, weight, targets, bias=bias, softcap=30.0, return_entropy=True, backend=backend)
    assert 0 < watch.largest < n * v // 4, f"largest tensor {watch.largest} elements; N x V = {n * v}"


_RSS_PROBE = """
import sys, torch, endokern
backend, n, d, v = sys.argv[1], *map(int, sys.argv[2:])
torch.set_num_threads(2)
g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
hidden, weight = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g) / d ** 0.5
targets = torch.randint(0, v, (n,), generator=g)
def growth(fn):
    fn()  # once first: thread pools and library buffers are not the call's memory
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak resident set to the current one
    rss = lambda key: next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":")) * 1024
    before = rss("VmRSS")
    fn()
    return rss("VmHWM") - before
print(growth(lambda: endokern.soft_values(hidden, weight, targets, softcap=30.0, return_entropy=True, backend=backend)))
print(growth(lambda: torch.logsumexp(hidden @ weight.T, dim=1)))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's resident-set high-water mark")
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_peak_memory_is_not_n_by_v(backend):
    """What the process really allocates (C++ buffers too), not only PyTorch's tensors: growth of the peak RSS."""
    from endokern.ops.registry import unavailable_reason

    if unavailable_reason(backend, "cpu"):
        pytest.skip(unavailable_reason(backend, "cpu"))
    n, d, v = 4096, 32, 32768  # N x V fp32 logits: 512 MB
    out = subprocess.run([sys.executable, "-c", _RSS_PROBE, backend, str(n), str(d), str(v)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    ours, naive = map(int, out.stdout.split())
    logits = n * v * 4
    assert naive >= 0.9 * logits, f"the probe cannot see the naive path's {logits} bytes (saw {naive})"
    assert ours <= logits / 8, f"{backend}: peak resident set grew {ours / 2**20:.0f} MB; N x V fp32 is {logits >> 20} MB"


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(gen, backend):
    """Non-contiguous hidden rows (a gather of every other row) and a transposed-storage weight."""
    hidden, weight, targets, _ = make_inputs(gen, 40, 32, 500, torch.float32)
    hidden_strided = hidden[::2]
    weight_t = weight.t().contiguous().t()
    out = endokern.soft_values(hidden_strided, weight_t, targets[::2], backend=backend)
    assert_close_to_oracle(out, hidden_strided, weight, targets[::2], alpha=1.0, bias=None, softcap=None)


def test_empty_batch():
    w = torch.randn(10, 4)
    out = endokern.soft_values(torch.randn(0, 4), w, torch.zeros(0, dtype=torch.int64), return_entropy=True,
                               return_logit_sum=True)
    assert out.value.shape == (0,) and out.entropy.shape == (0,) and out.logit_sum.shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_logit_sum_is_off_by_default_and_changes_nothing_else(gen, backend, dtype):
    """The logit sum is a separate accumulator: asking for it leaves the other outputs' bits as they are, and
    without it the backend is called as before (no flag, three tensors back)."""
    from endokern.ops import registry

    hidden, weight, targets, bias = make_inputs(gen, 21, 40, 1300, dtype, with_bias=True)
    kwargs = dict(alpha=0.6, bias=bias, softcap=30.0, return_entropy=True, backend=backend)
    plain = endokern.soft_values(hidden, weight, targets, **kwargs)
    assert plain.logit_sum is None
    both = endokern.soft_values(hidden, weight, targets, return_logit_sum=True, **kwargs)
    for a, b in zip(plain[:3], both[:3]):
        assert same_bits(a, b)
    impl = registry.resolve(backend, hidden.device)
    ids = torch.where(targets == -100, -1, targets)
    assert len(impl(hidden, weight, ids, bias=bias.float(), alpha=0.6, softcap=30.0, return_entropy=False)) == 3


# ---- clear errors for every bad input of SPEC section 2 -------------------------------------------------


def _good():
    return torch.randn(4, 8), torch.randn(16, 8), torch.tensor([1, 2, -100, 15])


@pytest.mark.parametrize(
    "mutate,error,match",
    [
        (lambda h, w, t, kw: (h[:, :7], w, t, kw), ValueError, "D dimensions differ"),
        (lambda h, w, t, kw: (h[0], w, t, kw), ValueError, "2 dimension"),
        (lambda h, w, t, kw: (h, w.unsqueeze(0), t, kw), ValueError, "2 dimension"),
        (lambda h, w, t, kw: (h, w, t[:3], kw), ValueError, r"targets must have shape \[N=4\]"),
        (lambda h, w, t, kw: (h.long(), w, t, kw), TypeError, "integer, complex"),
        (lambda h, w, t, kw: (h, w.to(torch.complex64), t, kw), TypeError, "integer, complex"),
        (lambda h, w, t, kw: (h.double(), w.double(), t, kw), TypeError, "float64"),
        (lambda h, w, t, kw: (h.half(), w, t, kw), TypeError, "share one dtype"),
        (lambda h, w, t, kw: (h, w, t.float(), kw), TypeError, "integer tensor of token ids"),
        (lambda h, w, t, kw: (h, w, torch.tensor([1, 2, 16, 0]), kw), ValueError, r"targets\[2\] = 16 is outside"),
        (lambda h, w, t, kw: (h, w, torch.tensor([1, -1, 3, 0]), kw), ValueError, r"targets\[1\] = -1 is outside"),
        (lambda h, w, t, kw: (h, w, t, {"alpha": 0.0}), ValueError, "alpha must be a finite number > 0"),
        (lambda h, w, t, kw: (h, w, t, {"alpha": -1.0}), ValueError, "alpha must be"),
        (lambda h, w, t, kw: (h, w, t, {"alpha": float("nan")}), ValueError, "alpha must be"),
        (lambda h, w, t, kw: (h, w, t, {"softcap": 0.0}), ValueError, "softcap must be"),
        (lambda h, w, t, kw: (h, w, t, {"bias": torch.randn(15)}), ValueError, "bias has 15 entries"),
        (lambda h, w, t, kw: (h, w, t, {"backend": "gpu"}), RuntimeError, "unknown backend"),
        (lambda h, w, t, kw: (nan_at(h), w, t, kw), ValueError, "hidden contains NaN or Inf"),
        (lambda h, w, t, kw: (inf_at(h), w, t, kw), ValueError, "hidden contains NaN or Inf"),
        (lambda h, w, t, kw: (h, nan_at(w), t, kw), ValueError, "weight contains NaN or Inf"),
        (lambda h, w, t, kw: (h, -inf_at(w), t, kw), ValueError, "weight contains NaN or Inf"),
        (lambda h, w, t, kw: (h, w, t, {"bias": inf_at(torch.randn(16))}), ValueError, "bias contains NaN or Inf"),
        (lambda h, w, t, kw: (h, torch.randn(0, 8), t, kw), ValueError, "non-empty"),
        (lambda h, w, t, kw: ("h", w, t, kw), TypeError, "must be a torch.Tensor"),
    ],
)
def test_bad_inputs_raise_clear_errors(mutate, error, match):
    hidden, weight, targets, kwargs = mutate(*_good(), {})
    with pytest.raises(error, match=match):
        endokern.soft_values(hidden, weight, targets, backend=kwargs.pop("backend", "torch"), **kwargs)


def nan_at(x):
    x = x.clone()
    x.view(-1)[x.numel() // 2] = float("nan")
    return x


def inf_at(x):
    x = x.clone()
    x.view(-1)[-1] = float("inf")
    return x


@pytest.mark.parametrize("write", ["index", "data"])
def test_weight_modified_in_place_is_rechecked(write):
    hidden, weight, targets = _good()
    endokern.soft_values(hidden, weight, targets, backend="torch")
    if write == "index":
        weight[3, 3] = float("nan")  # same tensor, new version
    else:
        weight.data[3, 3] = float("nan")  # same tensor, same version: no check cached by version may hide it
    with pytest.raises(ValueError, match="weight contains NaN"):
        endokern.soft_values(hidden, weight, targets, backend="torch")


@pytest.mark.parametrize("name", ["cpu", "triton"])
def test_unavailable_backend_says_why(monkeypatch, name):
    """A backend that cannot load is refused by name with its reason, and "auto" falls back to torch."""
    from endokern.ops import cpu_backend, triton_backend

    reason = "the stand-in reason this backend cannot load"
    if name == "cpu":
        monkeypatch.setattr(cpu_backend, "UNAVAILABLE", reason)
    else:
        monkeypatch.setattr(triton_backend, "IMPORT_ERROR", reason)
    hidden, weight, targets = _good()
    assert reason in endokern.available_backends("cpu")[name]
    with pytest.raises(RuntimeError, match=f"backend '{name}' is unavailable: .*{reason}"):
        endokern.soft_values(hidden, weight, targets, backend=name)
    if name == "cpu":  # auto on CPU tensors: the C++ kernel when built, else the torch backend
        out = endokern.soft_values(hidden, weight, targets, backend="auto")
        same = endokern.soft_values(hidden, weight, targets, backend="torch")
        assert same_bits(out.value, same.value)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_tl_dot_path_under_interpreter(gen, dtype):
    """The interpreter's default sums products in index order; this runs the GPU's tl.dot line too."""
    from endokern.ops import registry, triton_backend

    if TEST_DEVICE.type != "cpu" or registry.unavailable_reason("triton", TEST_DEVICE):
        pytest.skip("needs triton under the interpreter")
    hidden, weight, targets, bias = make_inputs(gen, 37, 40, 700, dtype, with_bias=True)
    cfg = triton_backend.kernel_config(TEST_DEVICE, dtype)._replace(broadcast_dot=False)
    ids = torch.where(targets == -100, -1, targets)
    value, target_logit, entropy, logit_sum = triton_backend.forward(
        hidden, weight, ids, bias=bias, alpha=0.7, softcap=30.0, return_entropy=True, config=cfg, return_logit_sum=True
    )
    target_logit = torch.where(ids >= 0, target_logit, float("nan"))
    out = endokern.SoftValues(value, target_logit, entropy, logit_sum)
    assert_close_to_oracle(out, hidden, weight, targets, alpha=0.7, bias=bias, softcap=30.0, label="tl.dot")


# ---- GPU only: tensor-core numerics at real sizes --------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,v,softcap", [(2048, 4096, 128256, None), (1000, 2304, 256000, 30.0), (3, 576, 49152, None)])
def test_gpu_triton_no_worse_than_torch_in_dtype(gen, dtype, n, d, v, softcap):
    hidden, weight, targets, bias = make_inputs(gen, n, d, v, dtype)
    out = endokern.soft_values(hidden, weight, targets, softcap=softcap, return_entropy=True, backend="triton")
    own = soft_values_in_dtype(hidden, weight, targets, softcap=softcap)
    h64, w64 = hidden.double(), weight.double()
    z = h64 @ w64.T  # float64 on the GPU: exact enough as ground truth, too big for the CPU oracle
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    ref_v = torch.logsumexp(z, dim=1)
    has = targets != -100
    ref_t = z.gather(1, torch.where(has, targets, 0).unsqueeze(1)).squeeze(1)
    logp = torch.log_softmax(z, dim=1)
    ref_e = -(logp.exp() * logp).sum(dim=1)
    for name, got, mine, truth, mask in (
        ("value", out.value, own[0], ref_v, torch.ones_like(has)),
        ("target_logit", out.target_logit, own[1], ref_t, has),
        ("entropy", out.entropy, own[2], ref_e, torch.ones_like(has)),
    ):
        err = (got.double() - truth)[mask].abs().max()
        own_err = (mine.double() - truth)[mask].abs().max()
        assert err <= 1.05 * own_err + 1e-5 * truth[mask].abs().max(), f"{name}: {err} vs torch's own {own_err}"
    for _ in range(10):
        again = endokern.soft_values(hidden, weight, targets, softcap=softcap, return_entropy=True, backend="triton")
        for a, b in zip(out, again):
            assert same_bits(a, b)


# ---- the C++ kernel: every SIMD path this CPU supports --------------------------------------------------


def _simd_paths():
    from endokern.ops import cpu_backend

    return cpu_backend.supported_simd() or [pytest.param("none", marks=pytest.mark.skip(reason="not built"))]


@pytest.mark.parametrize("simd", _simd_paths())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,v", [(37, 64, 1000), (130, 47, 2777), (1, 9, 50)], ids=str)
def test_cpu_simd_paths_match_oracle(gen, monkeypatch, simd, dtype, n, d, v):
    monkeypatch.setenv("ENDOKERN_CPU_SIMD", simd)
    # CPU tensors also on a CUDA machine: the C++ kernel runs CPU tensors only.
    hidden, weight, targets, bias = make_inputs(gen, n, d, v, dtype, with_bias=True, device="cpu")
    for kwargs in (dict(alpha=0.5, bias=bias, softcap=30.0), dict(alpha=2.0, bias=None, softcap=None)):
        out = endokern.soft_values(hidden, weight, targets, return_entropy=True, return_logit_sum=True,
                                   backend="cpu", **kwargs)
        assert_close_to_oracle(out, hidden, weight, targets, label=simd, **kwargs)
    row = n // 2
    alone = endokern.soft_values(hidden[row : row + 1], weight, targets[row : row + 1], backend="cpu",
                                 return_entropy=True, return_logit_sum=True, **kwargs)
    for full, single in zip(out, alone):
        assert same_bits(full[row : row + 1], single)


def test_cpu_forced_unsupported_simd_is_refused(monkeypatch):
    from endokern.ops import cpu_backend

    if cpu_backend.UNAVAILABLE:
        pytest.skip("not built")
    monkeypatch.setenv("ENDOKERN_CPU_SIMD", "neon")
    with pytest.raises(RuntimeError, match="not supported"):
        endokern.soft_values(*_good(), backend="cpu")


# ---- the LM head's NaN/Inf check in the C++ kernel: no extra pass, every write seen ------------------------------


@pytest.mark.parametrize("simd", _simd_paths())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("write", ["index", "data", "numpy", "view"])
def test_cpu_kernel_sees_every_change_of_the_head(gen, monkeypatch, simd, dtype, write):
    """A head found finite by one call and then changed in place, by any route (one that bumps torch's version
    counter and ones that do not: ``.data``, NumPy), is refused by the next call, on every SIMD path and dtype; a
    clean call reads the head for NaN/Inf only inside the kernel (no separate pass)."""
    import importlib

    front = importlib.import_module("endokern.ops.soft_values")  # the module (the package exports the function)
    monkeypatch.setenv("ENDOKERN_CPU_SIMD", simd)
    n = int(torch.randint(1, 40, (1,), generator=gen))
    d = int(torch.randint(1, 80, (1,), generator=gen))  # odd D too: the bf16 path's padded last pair
    v = int(torch.randint(2, 3000, (1,), generator=gen))
    hidden, weight, targets, _ = make_inputs(gen, n, d, v, dtype, device="cpu")
    read = []
    original = front._check_finite
    monkeypatch.setattr(front, "_check_finite", lambda name, x: (read.append(name), original(name, x)))
    clean = endokern.soft_values(hidden, weight, targets, backend="cpu")
    assert "weight" not in read and bool(torch.isfinite(clean.value).all())
    bad = [float("nan"), float("inf"), -float("inf")][int(torch.randint(0, 3, (1,), generator=gen))]
    row, col = int(torch.randint(0, v, (1,), generator=gen)), int(torch.randint(0, d, (1,), generator=gen))
    version = weight._version
    if write == "index":
        weight[row, col] = bad
    elif write == "data":
        weight.data[row, col] = bad
    elif write == "view":
        weight.view(-1)[row * d + col] = bad
    else:
        as_bits = weight.view(torch.int16) if dtype != torch.float32 else weight.view(torch.int32)
        as_bits.numpy()[row, col] = torch.tensor([bad], dtype=dtype).view(as_bits.dtype).item()
    assert (weight._version == version) == (write in ("data", "numpy"))  # what a cache keyed on it would miss
    with pytest.raises(ValueError, match="weight contains NaN or Inf"):
        endokern.soft_values(hidden, weight, targets, backend="cpu")


def test_cpu_kernel_head_check_does_not_hide_an_overflow(gen):
    """Finite inputs whose logits overflow fp32 are not called a bad head: the values come back as they are."""
    from endokern.ops import cpu_backend

    if cpu_backend.UNAVAILABLE:
        pytest.skip("not built")
    hidden = torch.full((3, 4), 3e19) * (1 + torch.rand(3, 4, generator=gen))
    weight = torch.full((5, 4), 3e19) * (1 + torch.rand(5, 4, generator=gen))
    out = endokern.soft_values(hidden, weight, torch.tensor([0, 1, 4]), backend="cpu")
    assert not bool(torch.isfinite(out.value).any())
