"""What the options name on this machine, checked before any model loads or any file is created: the input files
exist and open as their extension says, the outputs have a known extension, the device and backend run here, and
the model is a folder with its tokenizer, a known name, or a hub id in the cache or on a reachable hub. Each check
raises :class:`~endokern.settings.SettingsError` with one line. (:mod:`endokern.settings` checks the values
themselves and reads no file.)"""

from __future__ import annotations

import os
from typing import Optional

from .settings import Settings, SettingsError

def check_environment(settings: Settings) -> Settings:
    """Check what the values name on this machine, without creating anything: the inputs exist and are files,
    the outputs have a known extension, the device and backend run here, the model is a folder with its
    tokenizer, a known name or a hub id that can be fetched; each input opens as what its extension says (a Parquet
    file has its footer). Raises :class:`SettingsError`. Returns ``settings``."""
    from .io import format_of

    for path in settings.input:
        if path == "-":
            if _stdin_is_terminal():
                raise SettingsError("no --input given and standard input is a terminal: endokern is waiting for "
                                    "JSON Lines rows there; give --input FILE, or pipe rows in")
            continue
        if os.path.isdir(path):
            raise SettingsError(f"--input {path} is a folder; give the data files in it")
        if not os.path.exists(path):
            raise SettingsError(f"--input {path}: no such file")
        _check_extension("--input", path, format_of)
        _check_opens(path, format_of(path))
    if settings.engine == "local":
        _check_extension("--output", settings.output, format_of, writing=True)
    for flag, path in (("--errors", settings.errors), ("--rejected", settings.rejected)):
        if path is not None and not (settings.engine == "ray" and flag == "--rejected"):
            _check_extension(flag, path, format_of, writing=True)
    if settings.plot is not None and not settings.plot.lower().endswith(".png"):
        raise SettingsError(f"--plot {settings.plot}: the histogram is a PNG file; name it *.png")
    check_device(settings.device, settings.backend)
    check_model(settings.model, settings.template)
    return settings


def _stdin_is_terminal() -> bool:
    import sys

    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stdin
        return False


def _check_extension(flag: str, path: str, format_of, writing: bool = False) -> None:
    """SettingsError when a data file's format cannot be told from its extension (or, writing, is a bare .json:
    the outputs are JSON Lines, which a reader of ``.json`` would take for one JSON document)."""
    try:
        format_of(path)
    except ValueError as err:
        raise SettingsError(f"{flag} {err}") from None
    lower = path.lower()
    if writing and path != "-" and lower.endswith((".json", ".json.gz")):
        raise SettingsError(f"{flag} {path}: endokern writes JSON Lines, one row a line; name it "
                            f"{path[: -len('.json.gz' if lower.endswith('.gz') else '.json')]}.jsonl"
                            f"{'.gz' if lower.endswith('.gz') else ''} (or .parquet)")


def check_device(device: Optional[str], backend: str = "auto") -> None:
    """SettingsError when ``device`` is not one torch knows or not present here, or ``backend`` cannot run on it."""
    import torch

    from .ops.registry import unavailable_reason

    try:
        dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError):
        raise SettingsError(f"--device {device!r} is not a device (use cpu, cuda, cuda:1 ...)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SettingsError(f"--device {device}: this machine has no CUDA device torch can use; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SettingsError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise SettingsError(f"--device {device}: MPS is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise SettingsError(f"--device {device}: endokern runs on cpu, cuda or mps")
    if backend != "auto":
        reason = unavailable_reason(backend, dev)
        if reason is not None:
            raise SettingsError(f"--backend {backend} cannot run on {dev}: {reason}; use --backend auto")


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def check_model(name: str, template: str = "auto") -> None:
    """SettingsError when ``name`` cannot be loaded as given, said before any load: a path that does not exist, a
    folder without a model or without tokenizer files, ``template='chat'`` with no chat template in the folder, or a
    name that is neither a local path, a known name, nor a hub id in the local cache or reachable on the hub."""
    from .assets import MODELS

    if name in MODELS:
        return
    if os.path.isdir(name):
        found = set(os.listdir(name))
        if "config.json" not in found:
            raise SettingsError(f"--model {name}: the folder has no config.json, so it holds no Hugging Face model")
        if not found & set(_TOKENIZER_FILES):
            raise SettingsError(f"--model {name}: the folder has no tokenizer files ({', '.join(_TOKENIZER_FILES)}); "
                                "save the model's tokenizer there (tokenizer.save_pretrained)")
        if template == "chat" and not _folder_has_chat_template(name):
            raise SettingsError(f"--template chat: the tokenizer of {name} has no chat template; use --template plain "
                                "(or auto)")
        return
    if name.lower().endswith(".gguf"):
        if not os.path.isfile(name):
            raise SettingsError(f"--model {name}: no such GGUF file")
        return
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name  # a hub id has one /
    if os.path.exists(name):
        raise SettingsError(f"--model {name} is a file, not a model folder, a .gguf file or a hub id")
    if looks_like_path:
        raise SettingsError(f"--model {name}: no such model folder")
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise SettingsError(f"--model {name!r} is not a local path, a known name ({', '.join(MODELS)}) or a hub id "
                            "(owner/name)") from None
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return
    if _hub_offline():
        raise SettingsError(f"--model {name} is not a local path nor a known name ({', '.join(MODELS)}), is not in "
                            "the Hugging Face cache, and the hub cannot be reached from here; give a model folder")


def _folder_has_chat_template(folder: str) -> bool:
    import json

    if any(os.path.exists(os.path.join(folder, f)) for f in ("chat_template.jinja", "chat_template.json")):
        return True
    try:
        with open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8") as f:
            return bool(json.load(f).get("chat_template"))
    except (OSError, ValueError):
        return True  # cannot tell here: the loaded tokenizer decides (still before any file is created)


def _hub_offline() -> bool:
    """Whether the Hugging Face hub is out of reach: offline mode set, or no TCP connection within 3 s."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get("TRANSFORMERS_OFFLINE", "0") not in \
            ("", "0"):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3):
            return False
    except OSError:
        return True


def _check_opens(path: str, fmt: str) -> None:
    """SettingsError when an input cannot be opened as its format: a Parquet file without a readable footer (a
    truncated file, or no Parquet at all), a file that cannot be read. (A damaged gzip file is read up to the damage,
    which the run records.)"""
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            with pq.ParquetFile(path) as f:
                f.metadata  # noqa: B018  (the footer: what a truncated file lacks)
        else:
            with open(path, "rb") as f:
                f.read(1)
    except Exception as err:  # pyarrow's and gzip's errors have no common base; the message says what is wrong
        what = "a Parquet file" if fmt == "parquet" else "a readable file"
        raise SettingsError(f"--input {path} is not {what} ({' '.join(str(err).split())})") from None
