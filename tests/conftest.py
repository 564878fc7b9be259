"""Test setup: the Triton interpreter on machines without CUDA, the backends to run, fresh seeds."""

import os
import secrets

# The Triton interpreter must be chosen before triton is first imported.
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover - torch is a hard dependency
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from endokern.ops.registry import BACKENDS, unavailable_reason  # noqa: E402

# CI sets ENDOKERN_REQUIRE_BACKENDS=torch,triton,cpu so a backend that fails to load fails the run
# instead of skipping quietly.
REQUIRED = {b for b in os.environ.get("ENDOKERN_REQUIRE_BACKENDS", "").split(",") if b}
TEST_DEVICE = torch.device("cuda" if _has_cuda else "cpu")


def backend_params():
    params = []
    for name in BACKENDS:
        reason = unavailable_reason(name, TEST_DEVICE)
        if reason is not None and name in REQUIRED:
            raise RuntimeError(f"backend {name!r} is required by ENDOKERN_REQUIRE_BACKENDS but {reason}")
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")


def pytest_collection_modifyitems(config, items):
    if _has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gen(request):
    """A torch.Generator with a fresh seed, printed so a failure can be replayed (ENDOKERN_SEED=...)."""
    seed = int(os.environ.get("ENDOKERN_SEED", secrets.randbits(48)))
    print(f"seed for {request.node.name}: ENDOKERN_SEED={seed}")
    g = torch.Generator().manual_seed(seed)
    return g
