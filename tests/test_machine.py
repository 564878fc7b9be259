"""endokern.machine: the CPUs a run may use (affinity, cgroup quota, other processes' load, overrides) and the dtype
``auto`` picks from the CPU's features; both forced here by mocking what the machine reports."""

from __future__ import annotations

import argparse
import random

import pytest
import torch
from model_utils import FIXTURE

from endokern import EndoRM, machine
from endokern.settings import ModelSettings, Settings, SettingsError

NATIVE = frozenset({"fpu", "avx2", "fma", "avx512f", "avx512_bf16"})
AMX = frozenset({"avx2", "fma", "amx_bf16", "amx_tile"})
AVX2_ONLY = frozenset({"fpu", "avx2", "fma", "f16c"})


@pytest.fixture
def rng():
    return random.Random()


@pytest.fixture(autouse=True)
def keep_torch_threads(monkeypatch):
    """Every test leaves torch's thread count, and the thread environment, as it found them."""
    before = torch.get_num_threads()
    for name in (machine.THREADS_ENV, "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------------- precision

def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512_bf16 amx_tile\n\n"
                    "processor\t: 1\nflags\t\t: fpu avx2 avx512_bf16 amx_tile\n")
    assert machine.cpu_flags(str(info)) == {"fpu", "avx2", "avx512_bf16", "amx_tile"}
    assert machine.cpu_flags(str(tmp_path / "none")) == frozenset()


@pytest.mark.parametrize("flags,native", [(NATIVE, True), (AMX, True), (AVX2_ONLY, False), (frozenset(), False)])
def test_auto_dtype_follows_the_cpu_features(flags, native):
    name, reason = machine.auto_dtype("cpu", flags)
    assert name == ("bfloat16" if native else "float32")
    assert ("native bf16" in reason) and (("no native" in reason) != native)
    assert machine.native_bf16(flags) is native
    assert machine.auto_dtype("cuda", AVX2_ONLY)[0] == "bfloat16" and machine.auto_dtype("mps", NATIVE)[0] == "float32"
    warning = machine.emulated_bf16_warning(flags)
    if native:
        assert warning is None
    else:
        assert "\n" not in warning and "emulated" in warning and machine.EMULATED_BF16_COST in warning


@pytest.mark.parametrize("flags", [NATIVE, AVX2_ONLY], ids=["native-bf16", "avx2-only"])
def test_from_pretrained_dtype_auto_and_the_bf16_warning(monkeypatch, capsys, flags):
    """Both paths of ``--dtype auto`` on this machine, by forcing the features the CPU reports."""
    monkeypatch.setattr(machine, "cpu_flags", lambda path=machine.CPUINFO: flags)
    native = flags is NATIVE
    rm = EndoRM.from_pretrained(FIXTURE, device="cpu", dtype="auto", verify_head=False)
    err = capsys.readouterr().err
    assert rm.head.weight.dtype == (torch.bfloat16 if native else torch.float32)
    assert f"--dtype auto: {'bfloat16' if native else 'float32'}" in err
    result = rm.score(["Once upon a time"], [" there was a cat."])[0]
    assert result.num_tokens > 0 and result.reward == result.reward  # a number, not NaN
    # an explicit bf16: a one-line warning only where it is emulated; float32 never warns
    rm = EndoRM.from_pretrained(FIXTURE, device="cpu", dtype="bfloat16", verify_head=False)
    lines = [line for line in capsys.readouterr().err.splitlines() if "emulated" in line]
    assert rm.head.weight.dtype == torch.bfloat16 and len(lines) == (0 if native else 1)
    if not native:
        assert machine.EMULATED_BF16_COST in lines[0]
    EndoRM.from_pretrained(FIXTURE, device="cpu", dtype="float32", verify_head=False)
    assert "emulated" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------- threads

def _cgroup(root, proc, lines, files):
    proc.write_text("\n".join(lines) + "\n")
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return str(root), str(proc)


def test_cgroup_v2_quota_is_the_smallest_along_the_path(tmp_path, rng):
    quota = rng.randint(50_000, 800_000)
    root, proc = _cgroup(tmp_path / "cg", tmp_path / "cgroup", ["0::/user.slice/job"], {
        "cpu.max": "max 100000",
        "user.slice/cpu.max": f"{quota * 2} 100000",
        "user.slice/job/cpu.max": f"{quota} 100000",
    })
    assert machine.cgroup_cpu_limit(root, proc) == pytest.approx(quota / 100000)
    root, proc = _cgroup(tmp_path / "cg2", tmp_path / "cgroup2", ["0::/"], {"cpu.max": "max 100000"})
    assert machine.cgroup_cpu_limit(root, proc) is None
    assert machine.cgroup_cpu_limit(str(tmp_path / "nothing"), str(tmp_path / "nothing")) is None


def test_cgroup_v1_quota_and_no_quota(tmp_path, rng):
    period = rng.choice([100_000, 50_000])
    quota = rng.randint(period // 2, 6 * period)
    root, proc = _cgroup(tmp_path / "cg", tmp_path / "cgroup", ["4:memory:/x", "3:cpu,cpuacct:/docker/abc"], {
        "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": str(quota),
        "cpu,cpuacct/docker/abc/cpu.cfs_period_us": str(period),
    })
    assert machine.cgroup_cpu_limit(root, proc) == pytest.approx(quota / period)
    root, proc = _cgroup(tmp_path / "cg1", tmp_path / "cgroup1", ["1:cpu:/"], {
        "cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"})
    assert machine.cgroup_cpu_limit(root, proc) is None


@pytest.mark.parametrize("affinity,quota,expected", [(8, None, 8), (8, 2.5, 2), (8, 0.5, 1), (2, 6.0, 2), (1, None, 1)])
def test_usable_cpus_are_the_affinity_capped_by_the_quota(monkeypatch, affinity, quota, expected):
    monkeypatch.setattr(machine, "_affinity", lambda: affinity)
    monkeypatch.setattr(machine, "cgroup_cpu_limit", lambda *a, **k: quota)
    count, reason = machine.usable_cpus()
    assert count == expected
    assert ("cgroup quota" in reason) == (quota is not None and quota < affinity)


def test_resolve_threads_overrides_and_auto(monkeypatch, rng):
    affinity = rng.randint(2, 64)
    busy = rng.randint(0, affinity + 3)
    monkeypatch.setattr(machine, "_affinity", lambda: affinity)
    monkeypatch.setattr(machine, "cgroup_cpu_limit", lambda *a, **k: None)
    monkeypatch.setattr(machine, "busy_cpus", lambda *a, **k: busy)
    # auto: every usable CPU, fixed (a row's bits never depend on the load); adaptive: less the busy ones, at least
    # one, looked at again per batch
    count, adaptive, reason = machine.resolve_threads(None)
    assert (count, adaptive) == (affinity, False) and "auto" in reason
    assert machine.resolve_threads("auto")[:2] == (affinity, False)
    count, adaptive, reason = machine.resolve_threads("adaptive")
    assert count == max(1, affinity - busy) and adaptive and "adaptive" in reason
    assert machine.resolve_threads("all")[:2] == (affinity, False)
    n = rng.randint(1, 99)
    assert machine.resolve_threads(n)[:2] == (n, False) and machine.resolve_threads(str(n))[:2] == (n, False)
    # the environment variable, then OMP_NUM_THREADS, when no --threads is given; --threads wins over both
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert machine.resolve_threads(None)[:2] == (3, False)
    monkeypatch.setenv(machine.THREADS_ENV, str(n))
    count, adaptive, reason = machine.resolve_threads(None)
    assert (count, adaptive) == (n, False) and machine.THREADS_ENV in reason
    assert machine.resolve_threads(1)[0] == 1 and machine.resolve_threads("all")[0] == affinity
    monkeypatch.setenv(machine.THREADS_ENV, "all")
    assert machine.resolve_threads(None)[:2] == (affinity, False)
    monkeypatch.setenv(machine.THREADS_ENV, "lots")
    with pytest.raises(ValueError, match=machine.THREADS_ENV):
        machine.resolve_threads(None)
    for bad in (0, -1, "0", "x", True, "1.5"):
        with pytest.raises(ValueError, match="threads"):
            machine.resolve_threads(bad)


def test_thread_policy_gives_a_busy_cpu_up_at_once_and_takes_it_back_when_free():
    samples = iter([0, 2, 0, 0, 0, 0, 3, 9])
    policy = machine.ThreadPolicy(4, True, window=3, every=0.0, sample=lambda: next(samples))
    got = [policy.threads() for _ in range(8)]
    assert got == [4, 2, 2, 2, 4, 4, 1, 1]
    fixed = machine.ThreadPolicy(3, False, sample=lambda: 99)
    assert [fixed.threads() for _ in range(3)] == [3, 3, 3]


def test_busy_sample_reads_this_machine():
    assert machine.busy_sample() >= 0 and machine.busy_cpus(samples=2, interval=0.0) >= 0


def test_endorm_threads_set_torch_and_the_kernel(monkeypatch, rng):
    from model_utils import fixture_model

    model, tokenizer = fixture_model()
    n = rng.randint(1, 3)
    rm = EndoRM(model, tokenizer, threads=n, verify_head=False)
    assert rm.threads == n and torch.get_num_threads() == n and "--threads" in rm.threads_reason
    seen = []
    from endokern.ops import cpu_backend

    original = cpu_backend._cpu_kernel
    if original is not None:
        class Spy:
            def __getattr__(self, name):
                return getattr(original, name)

            def soft_values(self, *args, **kwargs):
                seen.append(args[17])  # the thread count the kernel is given
                return original.soft_values(*args, **kwargs)

        monkeypatch.setattr(cpu_backend, "_cpu_kernel", Spy())
    torch.set_num_threads(n + 1)  # someone else changed it: the next batch sets it back
    rm.score_ids([[5, 6, 7]], [[8, 9]])
    assert torch.get_num_threads() == n
    assert seen in ([], [n])
    monkeypatch.setenv(machine.THREADS_ENV, "1")
    assert EndoRM(model, tokenizer, verify_head=False).threads == 1
    with pytest.raises(ValueError, match="threads"):
        EndoRM(model, tokenizer, threads=0, verify_head=False)


def test_threads_and_dtype_auto_on_the_command_line():
    from endokern.cli import build_parser

    args = build_parser().parse_args(["score", "--threads", "3", "--dtype", "auto"])
    settings = Settings.from_args(args).validate()
    assert settings.threads == "3" and settings.dtype == "auto"
    assert settings.model_kwargs()["threads"] == "3"
    assert "threads" not in settings.run_key()  # how many threads does not decide the rows
    assert Settings.from_args(build_parser().parse_args(["score"])).threads is None
    for bad in ("0", "many", "-2"):
        with pytest.raises(SettingsError, match="--threads"):
            ModelSettings(threads=bad).validate()
    assert ModelSettings(threads="all").validate().threads == "all"
    parser = argparse.ArgumentParser()
    ModelSettings.add_arguments(parser, ("model",))
    assert parser.parse_args(["--threads", "auto"]).threads == "auto"
