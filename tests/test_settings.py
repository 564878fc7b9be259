"""Settings: one place for every option: defaults, checks, command-line flags and the run key."""

from __future__ import annotations

import argparse
import dataclasses
import json
import random

import pytest

from endokern.cli import build_parser
from endokern.settings import PACKINGS, Settings, SettingsError, check_reward


@pytest.fixture
def rng(gen):
    return random.Random(int(gen.initial_seed()))


def test_flags_parse_back_to_the_same_settings(rng):
    """Every option a file command has on the command line lands in the field of the same name."""
    alpha, gamma = rng.uniform(0.1, 3.0), rng.uniform(0.5, 1.0)
    chunk, tokens = rng.randint(1, 999), rng.randint(1, 99999)
    argv = ["filter", "--input", "a.jsonl", "b.parquet", "--output", "o.jsonl", "--alpha", repr(alpha), "--gamma",
            repr(gamma), "--terminal", "bootstrap", "--reduce", "mean", "--template", "chat", "--system", "be brief",
            "--append-eos", "--dtype", "bfloat16", "--backend", "torch", "--packing", "off", "--batch-tokens",
            str(tokens), "--max-length", "77", "--chunk-rows", str(chunk), "--limit", "5", "--num-shards", "3",
            "--shard-index", "2", "--no-progress", "--overwrite", "--min-reward", "-3.5", "--top-fraction", "0.25",
            "--rejected", "r.jsonl", "--plot", "p.png", "--errors", "e.jsonl", "--num-workers", "4"]
    got = Settings.from_args(build_parser().parse_args(argv)).validate()
    expected = Settings(command="filter", input=["a.jsonl", "b.parquet"], output="o.jsonl", alpha=alpha, gamma=gamma,
                        terminal="bootstrap", reduce="mean", template="chat", system="be brief", append_eos=True,
                        dtype="bfloat16", backend="torch", packing="off", batch_tokens=tokens, max_length=77,
                        chunk_rows=chunk, limit=5, num_shards=3, shard_index=2, progress=False, overwrite=True,
                        min_reward=-3.5, top_fraction=0.25, rejected="r.jsonl", plot="p.png", errors="e.jsonl",
                        num_workers=4)
    assert got == expected


@pytest.mark.parametrize("command", ["score", "compare", "rank", "filter"])
def test_defaults_of_the_flags_are_the_fields_defaults(command):
    args = build_parser().parse_args([command])
    got = Settings.from_args(args)
    assert got == Settings(command=command)
    # a command's own flags exist on that command only
    own = {"score": "per_token", "compare": "summary", "filter": "top_fraction"}
    for other, name in own.items():
        assert hasattr(args, name) == (other == command), (command, name)


def test_explain_and_eval_take_the_model_options_and_not_the_run_options():
    parser = build_parser()
    ev = parser.parse_args(["eval", "--output", "x", "--alpha", "0.5"])
    assert ev.alpha == 0.5 and not hasattr(ev, "gamma") and ev.chunk_rows == 64  # eval's own chunk default
    ex = parser.parse_args(["explain", "--prompt", "p", "--response", "r", "--gamma", "0.9"])
    assert ex.gamma == 0.9 and not hasattr(ex, "num_shards") and not hasattr(ex, "engine")


BAD = [
    ("alpha", 0.0, "alpha"), ("alpha", -1.0, "alpha"), ("alpha", float("inf"), "alpha"), ("alpha", float("nan"), "alpha"),
    ("gamma", float("nan"), "gamma"), ("terminal", "none", "terminal"), ("reduce", "max", "reduce"),
    ("template", "jinja", "template"), ("backend", "cuda", "backend"), ("packing", "yes", "packing"),
    ("dtype", "float64", "dtype"), ("batch_tokens", 0, "batch-tokens"), ("chunk_rows", 0, "chunk-rows"),
    ("max_length", 0, "max-length"), ("limit", -1, "limit"), ("num_shards", 0, "num-shards"),
    ("shard_index", 3, "shard-index"), ("command", "explain", "command"), ("engine", "spark", "engine"),
    ("input", [], "input"),
]


@pytest.mark.parametrize("name, value, says", BAD)
def test_every_bad_value_is_refused_with_its_name(name, value, says):
    settings = Settings(command="score", num_shards=3)
    settings = dataclasses.replace(settings, **{name: value})
    with pytest.raises(SettingsError, match=says):
        settings.validate()


def test_command_rules_are_checked_once_for_every_engine(rng):
    with pytest.raises(SettingsError, match="--min-reward, --top-fraction"):
        Settings(command="filter").validate()
    for bad in (0.0, 1.0 + rng.random(), -rng.random()):
        with pytest.raises(SettingsError, match="top-fraction"):
            Settings(command="filter", top_fraction=bad, output="o.jsonl").validate()
    Settings(command="filter", top_fraction=rng.uniform(0.01, 1.0), output="o.jsonl").validate()
    with pytest.raises(SettingsError, match="file --output"):
        Settings(command="filter", top_fraction=0.5).validate()
    for changes, says in (({"output": "-"}, "give --output DIR"), ({"output": "o.jsonl"}, "not o.jsonl"),
                          ({"input": ["-"]}, "standard input"), ({"num_shards": 2}, "num-shards"),
                          ({"num_workers": 0}, "num-workers")):
        with pytest.raises(SettingsError, match=says):
            Settings(engine="ray", **{"output": "out", "input": ["a.jsonl"], **changes}).validate()
    Settings(engine="ray", output="out.parquet", input=["a.jsonl"]).validate()  # a folder may end in .parquet


def test_check_reward_is_the_one_rule(rng):
    check_reward(rng.uniform(1e-3, 10), rng.uniform(0, 1), "zero", "sum")
    with pytest.raises(ValueError, match="alpha"):
        check_reward(-rng.random(), 1.0, "zero", "sum")
    for gamma in (-rng.uniform(1e-6, 2), 1 + rng.uniform(1e-6, 2), float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"gamma must be a discount in \[0, 1\]"):
            check_reward(1.0, gamma, "zero", "sum")


def test_run_key_holds_what_decides_the_output_and_nothing_else(rng, tmp_path):
    base = Settings(command="score", input=[str(tmp_path / "a.jsonl")], output="o.jsonl")
    key = base.run_key()
    assert key["input"] == [str(tmp_path / "a.jsonl")] and key["per_token"] is False and "engine" not in key
    # the order of a checkpoint written by earlier versions: a resumed run writes the same bytes
    assert list(key) == ["command", "model", "input", "template", "system", "append_eos", "alpha", "gamma",
                         "terminal", "reduce", "dtype", "backend", "packing", "batch_tokens", "chunk_rows",
                         "max_length", "num_shards", "shard_index", "limit", "per_token"]
    decides = {"alpha": rng.uniform(0.1, 2), "gamma": rng.uniform(0.1, 0.99), "terminal": "bootstrap",
               "reduce": "mean", "template": "plain", "chunk_rows": rng.randint(2, 99), "limit": rng.randint(1, 9),
               "max_length": rng.randint(9, 99), "batch_tokens": rng.randint(9, 999), "packing": "on"}
    for name, value in decides.items():
        assert base.replace(**{name: value}).run_key() != key, name
    # where it runs, how fast and how it shows progress do not change the rows
    same = {"device": "cpu", "progress": False, "overwrite": True, "num_workers": 7, "errors": "x.jsonl",
            "address": "auto", "num_cpus_per_worker": 2.0}
    for name, value in same.items():
        assert base.replace(**{name: value}).run_key() == key, name
    relative = base.replace(input=["rel.jsonl"]).run_key()["input"][0]
    assert relative.startswith("/") and relative.endswith("rel.jsonl")
    filt = base.replace(command="filter", min_reward=-1.0).run_key()
    assert filt["min_reward"] == -1.0 and filt["top_fraction"] is None and "per_token" not in filt
    assert base.replace(engine="ray").run_key()["engine"] == "ray"


def _another_value(f, value, rng):
    """A valid value of field ``f`` other than ``value``, found from the field itself (its choices, its type)."""
    choices = f.metadata.get("choices")
    if choices:
        return next(c for c in choices if c != value)
    kind = str(f.type)
    if "bool" in kind:
        return not value
    if "List" in kind:
        return [f"other-{rng.randint(0, 99)}.jsonl"]
    if "int" in kind:
        return (value or 1) + rng.randint(1, 9)
    if "float" in kind:
        return (value if value is not None else 0.5) * rng.uniform(0.1, 0.9)
    if f.name == "fields":
        return f"prompt=q{rng.randint(0, 99)},response=a"
    return f"other-{rng.randint(0, 99)}"


def test_every_key_field_is_in_the_run_key_and_no_other_field(rng, tmp_path):
    """Read off the dataclass, not a list: a field marked ``key`` changes the key when it changes (for a command's
    own field, on that command), and a field not marked never does."""
    key_fields = [f for f in dataclasses.fields(Settings) if f.metadata.get("key")]
    assert {"fields", "alpha", "input", "model", "per_token", "min_reward", "engine"} <= {f.name for f in key_fields}
    for f in dataclasses.fields(Settings):
        group = f.metadata.get("group")
        command = group if group in ("score", "compare", "rank", "filter") else rng.choice(["score", "compare",
                                                                                              "rank", "filter"])
        base = Settings(command=command, input=[str(tmp_path / "a.jsonl")], output="o.jsonl")
        if f.name == "command":
            continue  # every other value of command is another command: compared below
        changed = base.replace(**{f.name: _another_value(f, getattr(base, f.name), rng)})
        if f.metadata.get("key"):
            assert changed.run_key() != base.run_key(), f.name
            assert f.name in changed.run_key(), f.name
        else:
            assert changed.run_key() == base.run_key(), f.name
    keys = {c: Settings(command=c).run_key() for c in ("score", "compare", "rank", "filter")}
    assert len({json.dumps(k) for k in keys.values()}) == 4


def test_a_key_field_added_later_stays_out_of_the_key_while_unset(tmp_path):
    """Checkpoints written before --fields was part of the key resume: unset, it is not in the key at all."""
    base = Settings(command="score", input=[str(tmp_path / "a.jsonl")])
    assert "fields" not in base.run_key() and "engine" not in base.run_key()
    assert base.replace(fields="prompt=q").run_key()["fields"] == "prompt=q"


def test_model_kwargs_are_from_pretrained_s():
    import inspect

    from endokern import EndoRM

    settings = Settings(packing="off", dtype="float16", alpha=0.5)
    kwargs = settings.model_kwargs()
    accepted = set(inspect.signature(EndoRM.__init__).parameters) | {"device", "dtype"}
    assert set(kwargs) <= accepted
    assert kwargs["packing"] is PACKINGS["off"] is False and kwargs["alpha"] == 0.5 and kwargs["dtype"] == "float16"


def test_add_arguments_honours_a_parser_s_own_defaults():
    parser = argparse.ArgumentParser()
    Settings.add_arguments(parser, ("run",), defaults={"chunk_rows": 3})
    assert parser.parse_args([]).chunk_rows == 3 and parser.parse_args([]).progress is True
