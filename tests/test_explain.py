"""endokern explain (token pieces, the HTML page in a real headless browser, terminal colours), the CLI's
explain and filter --plot, with the stories260K fixture."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
from limits import HANG_S
from model_utils import FIXTURE, fixture_model

from endokern import EndoRM
from endokern.cli import main
from endokern.explain import explain, render_html, render_terminal, strip_ansi, token_pieces
from endokern.tokenization import EncodeError, TextExample

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PROMPT = "Once upon a time"
RESPONSES = [
    " there was a little girl named Lily.\nShe liked to play <b>&amp; \"run\" 'fast'\n\n  with her dog.",
    " héllo 日本 😀 ok\tthe big ball < 3 > 2 & sun",
]
ARRAYS = ("token_rewards", "token_logprobs", "token_values", "token_entropies")


def make_rm(**kwargs):
    model, tokenizer = fixture_model()
    return EndoRM(model, tokenizer, **kwargs)


@pytest.fixture(scope="module")
def pair():
    return explain(make_rm(), [TextExample(PROMPT, r) for r in RESPONSES], ["<chosen>", "rejected & co"],
                   template="plain")


def _decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("settings", [{}, {"alpha": 0.7, "gamma": 0.9, "terminal": "bootstrap", "reduce": "mean"}])
def test_pieces_concatenate_and_arrays_equal_a_direct_score(settings):
    rm = make_rm(**settings)
    tokenizer = rm.tokenizer
    got = explain(rm, [TextExample(PROMPT, r) for r in RESPONSES], template="plain")
    assert [e.label for e in got] == ["response 0", "response 1"]
    direct = rm.score([PROMPT] * 2, RESPONSES, template="plain", per_token=True, entropy=True)
    for e, d, text in zip(got, direct, RESPONSES):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        prompt_ids = tokenizer(PROMPT)["input_ids"]
        assert e.token_ids == ids and e.num_tokens == d.num_tokens == len(ids) == len(e.tokens)
        assert "".join(e.tokens) == e.response
        # the response is what its tokens add to the prompt's text (a leading space the tokenizer drops at the
        # start of a text is kept), and otherwise the tokens decoded alone
        assert _decode(tokenizer, prompt_ids + ids) == _decode(tokenizer, prompt_ids) + e.response
        assert e.response.strip() == _decode(tokenizer, ids).strip()
        assert e.prompt == _decode(tokenizer, prompt_ids)
        for name in ARRAYS:
            assert len(getattr(e, name)) == e.num_tokens
            assert getattr(e, name) == pytest.approx(getattr(d, name), rel=1e-5, abs=1e-5), name
        for name in ("reward", "reward_sum", "reward_mean", "logprob"):
            assert getattr(e, name) == pytest.approx(getattr(d, name), rel=1e-5, abs=1e-5), name
        assert e.reduce == rm.reduce
        assert all(h >= -1e-6 for h in e.token_entropies)
        for piece in e.tokens:
            assert "\ufffd" not in piece
    # a character made of several byte tokens belongs to the token that completes it; those before are empty
    second = got[1]
    for ch in ("日", "本", "😀"):
        assert ch in second.tokens
        k = second.tokens.index(ch)
        assert second.tokens[k - 1] == ""
    assert "\n" in "".join(got[0].tokens) and "\t" in "".join(got[1].tokens)


def test_token_pieces_without_context_and_errors():
    rm = make_rm()
    ids = rm.tokenizer("a 日本 day", add_special_tokens=False)["input_ids"]
    text, pieces = token_pieces(rm.tokenizer, ids)
    assert text == _decode(rm.tokenizer, ids) == "".join(pieces) and len(pieces) == len(ids)
    with pytest.raises(EncodeError, match="rejected: empty response"):
        explain(rm, [TextExample("a", " b"), TextExample("a", "")], ["chosen", "rejected"], template="plain")
    with pytest.raises(EncodeError, match="more than max_length 3"):
        explain(rm, [TextExample(PROMPT, RESPONSES[0])], template="plain", max_length=3)
    with pytest.raises(ValueError, match="labels"):
        explain(rm, [TextExample("a", " b")], ["x", "y"], template="plain")


class TokenSpans(HTMLParser):
    """The text of every ``span.tok`` of a page, in order, with its attributes."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tokens, self.attrs, self._open = [], [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "span" and "tok" in (attrs.get("class") or "").split():
            self._open = True
            self.tokens.append("")
            self.attrs.append(attrs)

    def handle_endtag(self, tag):
        if tag == "span":
            self._open = False

    def handle_data(self, data):
        if self._open:
            self.tokens[-1] += data


def spans_of(page):
    parser = TokenSpans()
    parser.feed(page)
    parser.close()
    return parser


def _rgb(colour):
    """'#rrggbb' or 'rgb(r, g, b)' -> (r, g, b)."""
    if colour.startswith("#"):
        return tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))
    return tuple(int(x) for x in re.findall(r"\d+", colour)[:3])


def _background(style):
    return _rgb(re.search(r"background(?:-color)?:\s*(#[0-9a-f]{6}|rgb\([^)]*\))", style).group(1))


def test_html_has_every_piece_escaped_in_order_and_nothing_external(pair):
    page = render_html(pair, title="pair <test>", subtitle="a & b")
    pos = 0
    for e in pair:
        for piece in e.tokens:
            idx = page.find(f">{html.escape(piece)}</span>", pos)
            assert idx >= 0, f"piece {piece!r} missing or out of order"
            pos = idx + 1
    assert "<chosen>" not in page and ">&lt;</span>" in page and ">&amp;</span>" in page and '"run' not in page
    assert "&lt;chosen&gt;" in page and "rejected &amp; co" in page and "pair &lt;test&gt;" in page
    assert html.escape(pair[0].prompt) in page
    assert not re.search(r"https?://", page, re.I)
    assert not re.search(r"\b(src|href)\s*=", page, re.I) and "url(" not in page and "@import" not in page
    assert 'grid-template-columns:repeat(2,' in page
    for e in pair:  # totals per response
        assert f"<b>{e.reward:.4f}</b>" in page and f"<b>{e.logprob:.4f}</b>" in page
        assert f"tokens <b>{e.num_tokens}</b>" in page
    spans = spans_of(page)
    assert spans.tokens == pair[0].tokens + pair[1].tokens
    rewards = pair[0].token_rewards + pair[1].token_rewards
    for attrs, reward, token_id in zip(spans.attrs, rewards, pair[0].token_ids + pair[1].token_ids):
        r, g, b = _background(attrs["style"])
        if abs(reward) > 0.05 * abs(max(rewards, key=abs)):
            assert (b > r) == (reward > 0), (reward, (r, g, b))  # blue above 0, red below
        assert f"id {token_id}\nreward {reward:+.4f}" in attrs["title"]
        assert attrs["data-id"] == str(token_id)
    newline_spans = [a for a, t in zip(spans.attrs, spans.tokens) if "\n" in t]
    assert newline_spans and all("nl" in a["class"].split() for a in newline_spans)
    assert all("\u21b5" in a["title"] for a in newline_spans)  # whitespace shown on hover
    by_entropy = render_html(pair, metric="entropy")
    assert 'data-metric="entropy" class="on"' in by_entropy and 'class="legend on" data-metric="entropy"' in by_entropy
    assert 'data-metric="reward" class="on"' in page and 'data-metric="reward" class="on"' not in by_entropy
    with pytest.raises(ValueError, match="metric"):
        render_html(pair, metric="value")


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("ENDOKERN_REQUIRE_CHROMIUM") == "1":
        pytest.fail("ENDOKERN_REQUIRE_CHROMIUM=1 but no chromium, chromium-browser or google-chrome on PATH")
    pytest.skip("no headless Chromium on PATH")


def _run_chromium(binary, tmp_path, *args):
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'profile'}", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_S)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_page_renders_in_headless_chromium(pair, tmp_path):
    binary = _chromium()
    page_path = tmp_path / "pair.html"
    page_path.write_text(render_html(pair), encoding="utf-8")
    url = page_path.resolve().as_uri()
    shot = tmp_path / "shot.png"
    _run_chromium(binary, tmp_path, f"--screenshot={shot}", "--window-size=1200,900", url)
    assert shot.read_bytes()[:8] == PNG_SIGNATURE
    import numpy as np
    from matplotlib import image

    pixels = image.imread(str(shot))[..., :3]
    assert pixels.shape[0] >= 900 and pixels.shape[1] >= 1200  # 1200 x 900 CSS pixels (more on a HiDPI scale)
    colours = np.unique((pixels * 255).round().astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 100, f"only {len(colours)} colours: a blank page?"
    rgb = (pixels * 255).astype(int)
    reddish = (rgb[..., 0] - rgb[..., 2] > 60).mean()
    bluish = (rgb[..., 2] - rgb[..., 0] > 60).mean()
    assert reddish > 1e-4 and bluish > 1e-4, (reddish, bluish)  # both reward colours drawn

    dom = _run_chromium(binary, tmp_path, "--dump-dom", url)
    spans = spans_of(dom)
    assert spans.tokens == pair[0].tokens + pair[1].tokens
    assert 'data-ready="1"' in dom  # the page's script ran without an error
    # opened as #entropy, the script colours every token by its entropy colour
    dom = _run_chromium(binary, tmp_path, "--dump-dom", url + "#entropy")
    spans = spans_of(dom)
    assert len(spans.attrs) == len(pair[0].tokens) + len(pair[1].tokens)
    for attrs in spans.attrs:
        assert _background(attrs["style"]) == _rgb(attrs["data-entropy"].split()[0])
    assert re.search(r'<button[^>]*data-metric="entropy"[^>]*class="on"', dom)


def test_terminal_colours_and_plain(pair):
    coloured = render_terminal(pair, color=True)
    plain = render_terminal(pair, color=False)
    assert "\x1b[48;2;" in coloured and "\x1b[0m" in coloured
    assert "\x1b" not in plain
    body = strip_ansi(coloured)
    assert body.split("\n", 1)[1] == plain  # the same text, after one line naming the colour scale
    pos = 0
    for e in pair:
        for piece in e.tokens:
            idx = plain.find(piece, pos)
            assert idx >= 0
            pos = idx + len(piece)
        assert f"reward (sum) {e.reward:.4f}" in plain and f"logprob {e.logprob:.4f}" in plain
        assert f"tokens {e.num_tokens}" in plain and f"--- {e.label} ---" in plain
    # a background never runs past a line break
    assert not re.search(r"\x1b\[48;2;[0-9;]*m[^\x1b]*\n", coloured)
    by_entropy = render_terminal(pair, color=True, metric="entropy")
    assert by_entropy != coloured and strip_ansi(by_entropy).split("\n", 1)[1] == plain


def run_cli(*args):
    return main([*map(str, args), "--model", FIXTURE, "--template", "plain"])


def test_cli_explain_prompt_and_responses(tmp_path, capsys):
    out = tmp_path / "page.html"
    assert run_cli("explain", "--prompt", PROMPT, "--response", RESPONSES[0], "--response", RESPONSES[1],
                   "--html", out) == 0
    stdout = capsys.readouterr().out
    assert "\x1b" not in stdout  # not a terminal
    expected = explain(make_rm(), [TextExample(PROMPT, r) for r in RESPONSES], template="plain")
    assert stdout == render_terminal(expected, color=False)
    page = out.read_text(encoding="utf-8")
    assert spans_of(page).tokens == expected[0].tokens + expected[1].tokens
    assert f"<b>{expected[1].reward:.4f}</b>" in page
    assert run_cli("explain", "--prompt", PROMPT, "--response", RESPONSES[0], "--color", "always",
                   "--color-by", "logprob", "--alpha", "0.5") == 0
    stdout = capsys.readouterr().out
    assert "\x1b[48;2;" in stdout and "colour: log-prob" in stdout
    assert f"{explain(make_rm(alpha=0.5), [TextExample(PROMPT, RESPONSES[0])], template='plain')[0].reward:.4f}" \
        in stdout
    for bad, reason in ((["--prompt", PROMPT], "give --prompt"), (["--response", "x"], "give --prompt"),
                        (["--prompt", PROMPT, "--response", ""], "empty response"),
                        (["--prompt", PROMPT, "--response", " the" * 600], "512 positions"),
                        (["--prompt", PROMPT, "--response", " the" * 9, "--max-length", 8], "max_length 8")):
        with pytest.raises(SystemExit, match=reason):
            run_cli("explain", *bad)


def test_cli_explain_rows_of_every_layout(tmp_path, capsys):
    rows = [
        {"id": "s", "prompt": PROMPT, "response": " there was a cat."},
        {"prompt": PROMPT, "responses": [" a dog", " a big sun", " she ran"]},
        {"prompt": PROMPT, "chosen": " the girl was happy.", "rejected": " dog dog dog"},
        {"prompt": PROMPT, "chosen": [" a", " b c", " d e f"], "rejected": [" g", " h i", " j k l"]},
        {"input": PROMPT, "output_1": " one", "output_2": " two", "label": 2},
        {"prompt": PROMPT},
    ]
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
    expected_labels = [
        ["response"], ["response 0", "response 1", "response 2"], ["chosen", "rejected"],
        ["chosen[0]", "chosen[1]", "chosen[2]", "rejected[0]", "rejected[1]", "rejected[2]"], ["chosen", "rejected"],
    ]
    expected_texts = [[rows[0]["response"]], rows[1]["responses"], [rows[2]["chosen"], rows[2]["rejected"]],
                      rows[3]["chosen"] + rows[3]["rejected"], [" two", " one"]]
    for n, (labels, texts) in enumerate(zip(expected_labels, expected_texts)):
        page_path = tmp_path / f"row{n}.html"
        assert run_cli("explain", "--input", src, "--row", n, "--html", page_path) == 0
        stdout = capsys.readouterr().out
        page = page_path.read_text(encoding="utf-8")
        assert re.findall(r"<h2>(.*?)</h2>", page) == [html.escape(x) for x in labels]
        want = explain(make_rm(), [TextExample(PROMPT, t) for t in texts], labels, template="plain")
        assert spans_of(page).tokens == [p for e in want for p in e.tokens]
        assert stdout == render_terminal(want, color=False)
        assert f"rows.jsonl row {n}" in page
    assert "(id s)" in (tmp_path / "row0.html").read_text(encoding="utf-8")
    with pytest.raises(SystemExit, match="row 5 .*chosen"):
        run_cli("explain", "--input", src, "--row", 5)
    with pytest.raises(SystemExit, match="bad JSON"):
        run_cli("explain", "--input", src, "--row", 6)
    with pytest.raises(SystemExit, match="no row 7"):
        run_cli("explain", "--input", src, "--row", 7)
    with pytest.raises(SystemExit, match="not both"):
        run_cli("explain", "--input", src, "--prompt", "a", "--response", "b")


def test_cli_filter_plot_in_both_modes(tmp_path, monkeypatch):
    import endokern.plots as plots

    calls = []
    real = plots.histogram_png

    def recording(path, series, **kwargs):
        calls.append((series, kwargs))
        return real(path, series, **kwargs)

    monkeypatch.setattr(plots, "histogram_png", recording)
    words = "the cat dog girl boy sun park ran played happy sad big little tree ball home".split()
    rows = [{"id": i, "prompt": PROMPT, "response": " " + " ".join(words[(i * 7 + j) % len(words)]
                                                                      for j in range(2 + i % 5))}
            for i in range(16)]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rewards = sorted(r.reward for r in make_rm().score([r["prompt"] for r in rows], [r["response"] for r in rows],
                                                       template="plain"))
    cut = (rewards[5] + rewards[6]) / 2
    for mode, extra in (("min", ["--min-reward", cut]), ("top", ["--top-fraction", "0.25"])):
        png = tmp_path / f"{mode}.png"
        assert run_cli("filter", "--input", src, "--output", tmp_path / f"{mode}.jsonl", "--plot", png,
                       "--no-progress", *extra) == 0
        data = png.read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 1000
        series, kwargs = calls[-1]
        kept = [json.loads(x)["reward"] for x in (tmp_path / f"{mode}.jsonl").read_text().splitlines()]
        rejected = [json.loads(x)["reward"] for x in (tmp_path / f"{mode}.rejected.jsonl").read_text().splitlines()]
        assert sorted(series["kept"]) == sorted(kept) and sorted(series["rejected"]) == sorted(rejected)
        assert len(kept) == (10 if mode == "min" else 4) and len(kept) + len(rejected) == 16
        if mode == "min":
            assert kwargs["thresholds"] == {"min-reward": cut}
        else:
            assert min(kept) >= kwargs["thresholds"]["top-fraction threshold"] > max(rejected)
    with pytest.raises(SystemExit, match="--plot needs a file"):
        run_cli("filter", "--input", src, "--min-reward", "0", "--plot", tmp_path / "x.png")


def test_one_row_of_a_file_from_python(tmp_path):
    from endokern.explain import read_row, row_examples
    from endokern.layouts import RowError

    rows = [{"prompt": "p", "response": "r"}, {"prompt": "p", "responses": ["a", "b", "c"]},
            {"prompt": "p", "chosen": ["a", "b"], "rejected": ["c", "d"]}, {"prompt": "p", "chosen": "a"}]
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{bad\n")
    assert [read_row(str(src), i) for i in range(4)] == rows
    assert row_examples(rows[0], "plain") == ([TextExample("p", "r")], ["response"])
    assert row_examples(rows[1], "plain")[1] == ["response 0", "response 1", "response 2"]
    examples, labels = row_examples(rows[2], "plain")
    assert labels == ["chosen[0]", "chosen[1]", "rejected[0]", "rejected[1]"]
    assert [e.response for e in examples] == ["a", "b", "c", "d"]
    with pytest.raises(RowError, match="rejected"):
        row_examples(rows[3], "plain")
    for index, says in ((4, "bad JSON"), (5, "no row 5"), (-1, ">= 0")):
        with pytest.raises(ValueError, match=says):
            read_row(str(src), index)


def test_explain_a_row_through_fields(tmp_path, capsys):
    """--fields maps a row's columns as the file commands do: the page equals that of the plain layout."""
    src = tmp_path / "judged.jsonl"
    src.write_text(json.dumps({"question": PROMPT, "response_A": RESPONSES[0], "response_B": RESPONSES[1],
                               "label": "B>A"}) + "\n")
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"prompt": PROMPT, "chosen": RESPONSES[1], "rejected": RESPONSES[0]}) + "\n")
    assert run_cli("explain", "--input", plain, "--row", 0) == 0
    want = capsys.readouterr().out
    assert run_cli("explain", "--input", src, "--row", 0,
                   "--fields", "prompt=question,response_a=response_A,response_b=response_B") == 0
    assert capsys.readouterr().out == want
    with pytest.raises(SystemExit, match="unknown name"):
        run_cli("explain", "--input", src, "--row", 0, "--fields", "question=prompt")
