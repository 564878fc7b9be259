"""The docs check: every command and Python example in README.md and docs/*.md is run or parsed here, so the docs
stay true.

What is checked, block by block (fenced code blocks):

- Every ``endokern ...`` (or ``python -m endokern ...``) command is parsed by endokern's own argument parser; the
  file commands (score, compare, rank, filter) also build their :class:`endokern.settings.Settings` and validate it.
  So every flag and value shown exists.
- The commands that need no network, GPU, Ray cluster, server or outside data run end to end, in order, in a fresh
  folder per block, on the small real test model ``tests/fixtures/stories260K``. Substitutions, and only these: the
  default model (``smollm2-135m-instruct``, a 100 MB download) is replaced by a copy of the test model with a small
  chat template (the default model is a chat model); and the input files the docs name but do not ship
  (``rows.jsonl``, ``pairs.jsonl``, ...) are small stand-ins in the same layout, written by :func:`stand_ins`.
  Files under ``examples/`` are the real ones.
- In ```` ```console ```` blocks, the lines after a ``$ command`` are its expected output: each one must appear in
  what the command printed, and ``$ echo $?`` followed by a number checks the exit status.
- Other commands: ``pip install`` extras must exist in pyproject.toml; a ``python`` or ``bash`` script must exist
  and have every ``--flag`` shown; a ``pytest`` path must exist. ``ray``, ``curl`` and ``pytest-benchmark`` lines
  need a cluster, a server or saved runs: they are listed in :data:`EXTERNAL`, not run.
- Every ```` ```python ```` block runs, with the default model replaced as above, in a folder with the same
  stand-ins. A block that needs a server, a Ray cluster, a GPU or a training setup is marked in the markdown with
  ``<!-- docs-check: skip: REASON -->`` on the line before it; a marker without a reason fails.
- ```` ```json ```` blocks parse; relative links (and their ``#anchors``) point at files and headings that exist;
  README.md holds CI's test command byte for byte.

Run with ``-s`` (or ``-rs``) to see the summary: what ran, what was only parsed and why, what was skipped and why.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "stories260K"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DEFAULT_MODEL = "smollm2-135m-instruct"  # endokern.assets.DEFAULT_MODEL (checked below)
FILE_COMMANDS = ("score", "compare", "rank", "filter")
# Programs the docs show that this check does not run, and why.
EXTERNAL = {
    "ray": "starts or joins a Ray cluster",
    "curl": "talks to a running endokern serve server",
    "pytest-benchmark": "compares saved benchmark runs",
    "git": "commits results to the repository",
}
# The fixture model with a small chat template (the default model is a chat model); as in tests/test_tokenization.py.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<s>' if loop.first else '' }}{{ m['role'] }}: {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}</s>{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
SKIP_MARKER = re.compile(r"<!--\s*docs-check:\s*skip\b:?(.*?)-->")


# ------------------------------------------------------------------------------------------------ reading the docs


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    skip: Optional[str] = None  # the reason of a skip marker right before the block ("" for a marker without one)

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def read_blocks(page: Path) -> List[Block]:
    """The fenced code blocks of a markdown page, with the skip marker on the line before each."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        stripped = lines[i].strip()
        if stripped.startswith("```"):
            lang, start, body = stripped[3:].strip(), i, []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
            marker = SKIP_MARKER.search(before)
            skip = marker.group(1).strip() if marker else None
            blocks.append(Block(page, start + 1, lang, textwrap.dedent("\n".join(body)), skip))
        i += 1
    return blocks


BLOCKS = [b for page in PAGES for b in read_blocks(page)]


@dataclass
class Command:
    block: Block
    line: int  # the command's line in the page
    argv: List[str]
    expected: List[str] = field(default_factory=list)  # console blocks: lines the command must print
    status: int = 0  # console blocks: the exit status after "$ echo $?"

    @property
    def where(self) -> str:
        return f"{self.block.page.relative_to(ROOT)}:{self.line}"


def logical_lines(block: Block) -> List[Tuple[int, str]]:
    """The block's lines with backslash continuations joined, each with its line number in the page."""
    out, pending, first = [], "", None
    for n, line in enumerate(block.text.splitlines(), start=block.line + 1):
        if first is None:
            first = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((first, pending + line))
        pending, first = "", None
    return out


def simple_commands(line: str) -> List[List[str]]:
    """A shell line as its simple commands (split at &&, ||, ;, |), comments, redirections and VAR=value dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands, current, tokens = [], [], list(lexer)
    skip_next = False
    for token in tokens:
        if skip_next:
            skip_next = False
            continue
        if token in ("&&", "||", ";", "|"):
            commands.append(current)
            current = []
        elif token in (">", ">>", "<", "2>"):
            skip_next = True
        elif not current and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", token):
            continue  # an environment assignment before the program
        else:
            current.append(token)
    commands.append(current)
    return [c for c in commands if c]


def commands_of(block: Block) -> List[Command]:
    """The commands of a shell or console block; in any other block but python, the endokern lines."""
    if block.lang == "python":
        return []
    out: List[Command] = []
    if block.lang == "console":
        lines = logical_lines(block)
        for n, line in lines:
            if line.startswith("$ "):
                for argv in simple_commands(line[2:]):
                    out.append(Command(block, n, argv))
            elif out and out[-1].argv == ["echo", "$?"]:
                out.pop()
                out[-1].status = int(line.strip())
            elif out and line.strip():
                out[-1].expected.append(line.strip())
        return out
    shell = block.lang in ("bash", "sh", "shell")
    for n, line in logical_lines(block):
        if not shell and not re.match(r"^\s*(endokern|python3? -m endokern)\b", line):
            continue
        for argv in simple_commands(line):
            out.append(Command(block, n, argv))
    return out


COMMANDS = [c for b in BLOCKS for c in commands_of(b)]


def endokern_argv(argv: List[str]) -> Optional[List[str]]:
    """The arguments after ``endokern`` (or ``python -m endokern``), or None for another program."""
    if argv[0] == "endokern":
        return argv[1:]
    if re.search(r"(^|/)python3?$", argv[0]) and argv[1:3] == ["-m", "endokern"]:
        return argv[3:]
    return None


ENDOKERN = [c for c in COMMANDS if endokern_argv(c.argv) is not None]
OTHERS = [c for c in COMMANDS if endokern_argv(c.argv) is None]


# ------------------------------------------------------------------------------------------------ the fixtures


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> str:
    """A copy of the test model whose tokenizer has a chat template: the stand-in for the default model."""
    folder = tmp_path_factory.mktemp("chat-model")
    for item in FIXTURE.iterdir():
        shutil.copy(item, folder / item.name)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return str(folder)


def _jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def stand_ins(folder: Path) -> None:
    """The input files the docs name, small and in the layout the docs describe, and a link to examples/."""
    q = "What is 2 + 2?"
    files = {
        "rows.jsonl": [{"prompt": q, "response": "4."}, {"prompt": q, "response": "Probably 5."},
                       {"prompt": "Name a colour.", "response": "Blue."}, {"prompt": "Say hi.", "response": "Hi!"}],
        "pairs.jsonl": [{"prompt": q, "chosen": "4.", "rejected": "5."},
                        {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "A fish."}],
        "candidates.jsonl": [{"prompt": q, "responses": ["4.", "5.", "Four."]}],
        "qa.jsonl": [{"question": q, "answer": {"text": "4."}}, {"question": "Say hi.", "answer": {"text": "Hi!"}}],
        "judgebench.jsonl": [{"question": q, "response_A": "4.", "response_B": "5.", "label": "A>B"}],
    }
    files["my_pairs.jsonl"] = files["pairs.jsonl"]
    for name, rows in files.items():
        (folder / name).write_text(_jsonl(rows))
    (folder / "examples").symlink_to(ROOT / "examples")


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A fresh folder with the stand-ins, as the working directory; loading the default model fails here."""
    import endokern.assets

    resolve_model = endokern.assets.resolve_model

    def no_default_model(name, *args, **kwargs):
        assert name != DEFAULT_MODEL, ("a docs example loads the default model without naming it: name it, so that "
                                       "the docs check runs the example on the test model")
        return resolve_model(name, *args, **kwargs)

    monkeypatch.setattr(endokern.assets, "resolve_model", no_default_model)
    stand_ins(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ------------------------------------------------------------------------------------------------ endokern commands


def parse(args: List[str]):
    """Parse with endokern's own parser (and, for the file commands, build and validate their Settings); None for
    --help and --version, which end the parse."""
    import endokern.settings
    from endokern.cli import build_parser
    from endokern.settings import Settings

    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            ns = build_parser().parse_args(args)
    except SystemExit as exit_:
        assert exit_.code == 0, f"the parser refused it: {err.getvalue().strip()}"
        return None
    if ns.command in FILE_COMMANDS:
        Settings.from_args(ns).validate()
    model_settings = getattr(endokern.settings, "ModelSettings", None)  # the model's part of the settings
    if ns.command in ("explain", "eval", "serve") and model_settings is not None:
        model_settings.from_args(ns).validate()
    if ns.command == "serve":
        from endokern.serve import ServeOptions

        ServeOptions.from_args(ns).validate()
    return ns


def option(args: List[str], name: str) -> Optional[str]:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def values(args: List[str], name: str) -> List[str]:
    """The values after ``name`` up to the next flag (nargs='+')."""
    if name not in args:
        return []
    out = []
    for a in args[args.index(name) + 1:]:
        if a.startswith("--"):
            break
        out.append(a)
    return out


def parse_only_reason(args: List[str], where: Path) -> Optional[str]:
    """Why a documented endokern command is only parsed here, or None when it runs end to end."""
    if "--help" in args or "--version" in args or not args:
        return None
    command = args[0]
    if command == "serve":
        return "serve runs until stopped (tests/test_serve.py runs the server)"
    if option(args, "--engine") == "ray":
        return "--engine ray starts a Ray cluster (tests/integrations/test_ray.py runs it)"
    if (option(args, "--device") or "cpu").startswith("cuda"):
        return "needs a GPU"
    model = option(args, "--model")
    if model not in (None, DEFAULT_MODEL) and not Path(where, model).exists():
        return f"--model {model} is a hub model (network)"
    if command == "eval":
        if option(args, "--data") is not None or not all(Path(where, s).is_file() for s in values(args, "--suite")):
            return "the evaluation suites' data is not in the repository"
    inputs = values(args, "--input") if command != "explain" else [option(args, "--input")] * ("--input" in args)
    missing = [p for p in inputs if p != "-" and not Path(where, p).exists()]
    if missing:
        return f"no stand-in for the input {missing[0]}"
    return None


def run_endokern(args: List[str], model: str) -> Tuple[int, str]:
    """Run one command in this process; its exit status and everything it printed."""
    from endokern.cli import main

    if args and args[0] not in ("backends",) and not ("--help" in args or "--version" in args):
        if "--model" in args:
            i = args.index("--model")
            args = args[: i + 1] + [model if args[i + 1] == DEFAULT_MODEL else args[i + 1]] + args[i + 2:]
        else:
            args = args + ["--model", model]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        try:
            status = main(args)
        except SystemExit as exit_:
            status = exit_.code if isinstance(exit_.code, int) else 1
    return status or 0, printed.getvalue()


@pytest.mark.parametrize("command", ENDOKERN, ids=[c.where for c in ENDOKERN])
def test_every_endokern_command_parses(command):
    args = endokern_argv(command.argv)
    if command.status:  # a console example of a refused command: run, not parsed (test_blocks_run)
        from endokern.cli import build_parser

        with contextlib.redirect_stderr(io.StringIO()):
            build_parser().parse_args(args)
        return
    parse(args)


def _runnable(block: Block, where: Path) -> List[Command]:
    return [c for c in ENDOKERN if c.block is block and parse_only_reason(endokern_argv(c.argv), where) is None]


RUN_BLOCKS = [b for b in BLOCKS if any(c.block is b for c in ENDOKERN)]


@pytest.mark.parametrize("block", RUN_BLOCKS, ids=[b.where for b in RUN_BLOCKS])
def test_blocks_run(block, workdir, chat_model):
    """The block's runnable endokern commands, in order, in one fresh folder; console blocks' outputs and statuses."""
    commands = _runnable(block, workdir)
    if not commands:
        pytest.skip("every endokern command of this block is parse-only: "
                    + "; ".join(sorted({parse_only_reason(endokern_argv(c.argv), workdir) for c in ENDOKERN
                                        if c.block is block})))
    for command in commands:
        status, printed = run_endokern(endokern_argv(command.argv), chat_model)
        lines = [line.strip() for line in printed.splitlines()]
        assert status == command.status, f"{command.where}: {' '.join(command.argv)} exited {status}:\n{printed}"
        for want in command.expected:
            assert want in lines, f"{command.where}: {' '.join(command.argv)} did not print {want!r}:\n{printed}"
        RAN.append(command)


# ------------------------------------------------------------------------------------------------ other commands


def _extras() -> List[str]:
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return re.findall(r"^([A-Za-z0-9_-]+)\s*=", section, flags=re.M)


def check_other(argv: List[str]) -> Optional[str]:
    """Check a command of another program; returns why it is not checked further (EXTERNAL), else None."""
    program = argv[0]
    if program in EXTERNAL:
        return EXTERNAL[program]
    if program == "pip" or (re.search(r"(^|/)python3?$", program) and argv[1:3] == ["-m", "pip"]):
        verb = next(w for w in argv[1:] if w in ("install", "download"))
        words = argv[argv.index(verb) + 1:]
        for word in words:
            extras = re.match(r"^(?:\.|endokern)\[([^\]]*)\]$", word)
            if extras:
                for extra in extras.group(1).split(","):
                    assert extra in _extras(), f"pip extra {extra!r} is not in pyproject.toml"
        return None
    if re.search(r"(^|/)python3?$", program) and argv[1:3] == ["-m", "venv"]:
        return None
    if re.search(r"(^|/)python3?$", program) and argv[1:3] == ["-m", "pytest"]:
        for word in argv[3:]:
            if word.endswith(".py") or "/" in word and not word.startswith("-") and "=" not in word:
                assert (ROOT / word).exists(), f"{word} does not exist"
        return None
    if re.search(r"(^|/)python3?$", program) or program == "bash":
        script = ROOT / argv[1]
        assert script.is_file(), f"{argv[1]} does not exist"
        source = script.read_text()
        for word in argv[2:]:
            if word.startswith("--"):
                flag = word.split("=", 1)[0]
                assert re.search(rf"[\"'\s(]{re.escape(flag)}[\"'=)\s]", source), f"{argv[1]} has no option {flag}"
        return None
    raise AssertionError(f"the docs check does not know the program {program!r}: run it here, or add it to "
                         "EXTERNAL with the reason it cannot run")


@pytest.mark.parametrize("command", OTHERS, ids=[c.where for c in OTHERS])
def test_other_commands(command):
    check_other(command.argv)


# ------------------------------------------------------------------------------------------------ python blocks


PYTHON = [b for b in BLOCKS if b.lang == "python"]


@pytest.mark.parametrize("block", PYTHON, ids=[b.where for b in PYTHON])
def test_python_blocks_run(block, workdir, chat_model):
    if block.skip is not None:
        assert block.skip, f"{block.where}: a docs-check skip marker needs a reason"
        pytest.skip(block.skip)
    source = block.text.replace(repr(DEFAULT_MODEL), repr(chat_model)).replace(json.dumps(DEFAULT_MODEL),
                                                                                 repr(chat_model))
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(source, block.where, "exec"), {"__name__": "__docs__"})


# ------------------------------------------------------------------------------------------------ the rest


def test_skip_markers_have_reasons_and_sit_before_a_block():
    skipped = [b for b in BLOCKS if b.skip is not None]
    print(f"\n{len(skipped)} docs blocks skipped:")
    for b in skipped:
        print(f"  {b.where} ({b.lang}): {b.skip}")
    assert all(b.skip for b in skipped), [b.where for b in skipped if not b.skip]
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        markers = len(SKIP_MARKER.findall(text))
        assert markers == sum(1 for b in skipped if b.page == page), \
            f"{page.name}: a docs-check marker is not on the line right before a code block"


def test_json_blocks_parse():
    for block in (b for b in BLOCKS if b.lang == "json"):
        try:
            json.loads(block.text)
        except ValueError:
            for line in block.text.splitlines():
                json.loads(line)


def _anchors(page: Path) -> set:
    headings = re.findall(r"^#+\s+(.*)$", page.read_text(encoding="utf-8"), flags=re.M)
    return {re.sub(r"\s", "-", re.sub(r"[^\w\- ]", "", h.strip().lower())) for h in headings}


def test_links_point_at_files_and_headings():
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            assert file.exists(), f"{page.relative_to(ROOT)}: link to {target}: no such file"
            if anchor and file.suffix == ".md":
                assert anchor in _anchors(file), f"{page.relative_to(ROOT)}: link to {target}: no such heading"


def test_readme_holds_the_demo_and_ci_test_commands():
    from endokern.assets import DEFAULT_MODEL as default

    assert default == DEFAULT_MODEL
    readme = [line for b in read_blocks(ROOT / "README.md") for line in b.text.splitlines()]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    test_command = ci[ci.index("# The README's test command:") + 1]
    assert test_command in readme, "README.md must hold .ci/run's test command byte for byte"
    assert any(line.startswith("python -m pip install torch==") and "&& endokern compare --input examples/data/"
               in line for line in readme), "README.md must start with the demo command"


RAN: List[Command] = []


def test_summary_what_ran_what_was_parsed_what_was_skipped(workdir):
    """Runs last (pytest keeps file order): what the check covered. At least these commands must run end to end."""
    parse_only: Dict[str, List[str]] = {}
    for c in ENDOKERN:
        reason = parse_only_reason(endokern_argv(c.argv), workdir)
        if reason is not None:
            parse_only.setdefault(reason, []).append(c.where)
    external = [c for c in OTHERS if c.argv[0] in EXTERNAL]
    python_skipped = [b for b in PYTHON if b.skip is not None]
    print(f"\ndocs check over {len(PAGES)} pages, {len(BLOCKS)} code blocks:")
    print(f"  endokern commands: {len(ENDOKERN)} parsed, {len(RAN)} of them run end to end")
    for reason, where in sorted(parse_only.items()):
        print(f"    parse-only ({reason}): {len(where)}: {', '.join(where)}")
    print(f"  other commands: {len(OTHERS) - len(external)} checked (pip extras, scripts and their flags, pytest "
          f"paths), {len(external)} not run ({', '.join(sorted({c.argv[0] for c in external}))})")
    print(f"  python blocks: {len(PYTHON) - len(python_skipped)} run, {len(python_skipped)} skipped")
    if RAN:  # when the whole file ran: the commands every user meets first
        ran = {endokern_argv(c.argv)[0] for c in RAN}
        assert {"score", "compare", "rank", "filter", "explain"} <= ran, ran
