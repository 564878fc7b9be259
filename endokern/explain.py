"""Per-token views of the endogenous reward: which tokens of a response earn or lose reward.

:func:`explain` scores a few examples with every per-token quantity (reward ``r_h``, log-probability, soft
value ``V(s_h)``, entropy, self-certainty ``KL(U || softmax(z))``) and splits each response into the exact text pieces of its tokens.
:func:`render_html` turns the result into one self-contained page (tokens coloured by reward, details on
hover, responses side by side), :func:`render_terminal` into ANSI-coloured text.

Token pieces: the response text is the response tokens decoded after the last prompt token (so a leading
space that a SentencePiece tokenizer drops at the start of a text is kept), special tokens included and no
clean-up of spaces. Piece ``i`` is what decoding the first ``i + 1`` tokens adds to the text of the first
``i``. A character whose bytes span several byte-level tokens belongs to the token that completes it; the
tokens before get an empty piece. The pieces always concatenate to the response text.
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import layouts
from .io import read_rows
from .tokenization import EncodeError, TextExample

__all__ = ["Explanation", "explain", "render_html", "render_terminal", "token_pieces", "METRICS"]

# metric -> (Explanation field, how it is coloured, its name in the page)
METRICS: Dict[str, Tuple[str, str, str]] = {
    "reward": ("token_rewards", "diverging", "reward"),
    "logprob": ("token_logprobs", "low", "log-prob"),
    "entropy": ("token_entropies", "high", "entropy"),
    "self-certainty": ("token_self_certainty", "high", "self-certainty"),
}
ROBUST_PERCENTILE = 95.0  # the colour scale ends at this percentile of |value|
_WHITE = (255, 255, 255)
_NEGATIVE = (202, 0, 32)  # red: a negative reward, an unlikely token
_POSITIVE = (5, 113, 176)  # blue: a positive reward
_HIGH = (118, 42, 131)  # purple: a high entropy


@dataclass
class Explanation:
    """One response, token by token. ``response`` is ``"".join(tokens)``; the per-token lists have
    ``num_tokens`` entries; ``prompt`` is the prompt's token ids decoded (what the model conditioned on)."""

    label: str
    prompt: str
    response: str
    tokens: List[str]
    token_ids: List[int]
    token_rewards: List[float]
    token_logprobs: List[float]
    token_values: List[float]
    token_entropies: List[float]
    reward: float
    reward_sum: float
    reward_mean: float
    logprob: float
    num_tokens: int
    reduce: str = "sum"
    # KL(U || softmax(z)) of each token's state (confidence, whichever token was taken), and its mean
    token_self_certainty: Optional[List[float]] = None
    self_certainty: Optional[float] = None


def _decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _common_prefix(a: str, b: str, start: int) -> int:
    """The length of the common prefix of ``a`` and ``b``, given that it is at least ``start``."""
    n = min(len(a), len(b))
    i = min(start, n)
    while i < n and a[i] == b[i]:
        i += 1
    return i


def token_pieces(tokenizer, ids: Sequence[int], context: Sequence[int] = ()) -> Tuple[str, List[str]]:
    """``(text, pieces)`` of ``ids`` decoded after ``context`` (its last token is used): ``"".join(pieces) ==
    text`` and ``len(pieces) == len(ids)``. See the module doc for how pieces are cut (it decodes every prefix,
    so the time grows with the square of the length: fine for the few responses one looks at)."""
    ids = [int(t) for t in ids]
    ctx = [int(t) for t in context][-1:]
    base = _decode(tokenizer, ctx) if ctx else ""
    full = _decode(tokenizer, ctx + ids)
    if ctx and (not full.startswith(base) or base.endswith("\ufffd")):
        ctx, base, full = [], "", _decode(tokenizer, ids)  # the context does not decode apart from the response
    pieces: List[str] = []
    done = len(base)
    for i in range(len(ids)):
        if i == len(ids) - 1:
            end = len(full)
        else:
            # the part of this prefix's text that the whole text keeps: an incomplete character decodes to
            # U+FFFD, which differs from the character the later tokens complete, so it is left for them
            end = max(done, _common_prefix(_decode(tokenizer, ctx + ids[: i + 1]), full, done))
        pieces.append(full[done:end])
        done = end
    return full[len(base) :], pieces


def explain(
    rm,
    examples: Sequence[TextExample],
    labels: Optional[Sequence[str]] = None,
    *,
    template: str = "auto",
    system: Optional[str] = None,
    append_eos: bool = False,
    max_length: Optional[int] = None,
) -> List[Explanation]:
    """Score ``examples`` with ``rm`` (an :class:`endokern.EndoRM`) and return each response token by token.

    ``labels`` name the responses (default ``response`` or ``response 0``, ``response 1``, ...);
    ``template``, ``system``, ``append_eos`` tokenize as :meth:`EndoRM.score` does. An example that cannot be
    encoded, or is longer than ``max_length`` tokens, raises :class:`~endokern.tokenization.EncodeError` naming it.
    """
    examples = list(examples)
    if not examples:
        raise ValueError("explain needs at least one example")
    if labels is None:
        labels = ["response"] if len(examples) == 1 else [f"response {i}" for i in range(len(examples))]
    labels = [str(x) for x in labels]
    if len(labels) != len(examples):
        raise ValueError(f"{len(examples)} examples but {len(labels)} labels")
    encoded = rm.encoder(template, system=system, append_eos=append_eos).encode(examples)
    for label, item in zip(labels, encoded):
        if isinstance(item, EncodeError):
            raise EncodeError(f"{label}: {item}")
        if max_length is not None and item.length > max_length:
            raise EncodeError(f"{label}: {item.length} tokens, more than max_length {max_length}")
    results = rm.score_encoded(encoded, per_token=True, entropy=True, self_certainty=True)
    out = []
    for label, enc, res in zip(labels, encoded, results):
        text, pieces = token_pieces(rm.tokenizer, enc.response_ids, context=enc.prompt_ids)
        out.append(
            Explanation(
                label=label, prompt=_decode(rm.tokenizer, enc.prompt_ids), response=text, tokens=pieces,
                token_ids=list(enc.response_ids), token_rewards=list(res.token_rewards),
                token_logprobs=list(res.token_logprobs), token_values=list(res.token_values),
                token_entropies=list(res.token_entropies), reward=res.reward, reward_sum=res.reward_sum,
                reward_mean=res.reward_mean, logprob=res.logprob, num_tokens=res.num_tokens,
                reduce=getattr(rm, "reduce", "sum"), token_self_certainty=res.token_self_certainty,
                self_certainty=res.self_certainty,
            )
        )
    return out


def read_row(path: str, index: int) -> Dict[str, Any]:
    """Row ``index`` (0-based) of an input file any command reads; ValueError saying why it cannot be had."""
    if index < 0:
        raise ValueError(f"--row must be >= 0, got {index}")
    item = next(iter(read_rows(path, start=index)), None)
    if item is None:
        raise ValueError(f"{path} has no row {index}")
    if item.row is None:
        raise ValueError(f"row {index} of {path}: {item.error}")
    return item.row


def row_examples(row: Dict[str, Any], template: str) -> Tuple[List[TextExample], List[str]]:
    """The examples of a score, rank or preference row, and their labels (``chosen[0]``, ``rejected``...);
    :class:`endokern.layouts.RowError` when the row cannot be used. ``template`` is the resolved one."""
    if "responses" in row:
        examples = layouts.rank_examples(row)
        return examples, [f"response {i}" for i in range(len(examples))]
    if "response" in row or "messages" in row:
        return layouts.score_examples(row), ["response"]
    pref = layouts.preference_examples(row, template)
    if pref.grid:
        return pref.examples, [f"{side}[{i}]" for side in ("chosen", "rejected") for i in range(pref.k)]
    return pref.examples, ["chosen", "rejected"]


# ------------------------------------------------------------------------------------------------ colours


def robust_scale(values: Sequence[float], percentile: float = ROBUST_PERCENTILE) -> float:
    """The ``percentile``-th percentile of ``|values|`` (linear interpolation); the largest when that is 0,
    and 1 when every value is 0 or none is finite."""
    mags = sorted(abs(v) for v in values if math.isfinite(v))
    if not mags:
        return 1.0
    pos = (len(mags) - 1) * percentile / 100.0
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(mags) - 1)
    scale = mags[lo] + (mags[hi] - mags[lo]) * (pos - lo)
    if not scale > 0:
        scale = mags[-1]
    return scale if scale > 0 else 1.0


def _mix(end: Tuple[int, int, int], t: float) -> Tuple[int, int, int]:
    return tuple(round(w + (e - w) * t) for w, e in zip(_WHITE, end))  # type: ignore[return-value]


def metric_color(metric: str, value: float, scale: float) -> Tuple[Tuple[int, int, int], Tuple[int, int, int]]:
    """(background, text) colours of one token: rewards on a red-white-blue scale centred at 0, log-probs from
    white (0) to red (-scale), entropies from white (0) to purple (scale)."""
    kind = METRICS[metric][1]
    if not math.isfinite(value):
        return (200, 200, 200), (17, 17, 17)
    if kind == "diverging":
        t = max(-1.0, min(1.0, value / scale))
        bg, strength = _mix(_POSITIVE if t > 0 else _NEGATIVE, abs(t)), abs(t)
    elif kind == "low":
        strength = max(0.0, min(1.0, -value / scale))
        bg = _mix(_NEGATIVE, strength)
    else:
        strength = max(0.0, min(1.0, value / scale))
        bg = _mix(_HIGH, strength)
    return bg, ((255, 255, 255) if strength > 0.6 else (17, 17, 17))


def _hex(rgb: Tuple[int, int, int]) -> str:
    return "#%02x%02x%02x" % rgb


def _scales(explanations: Sequence[Explanation]) -> Dict[str, float]:
    return {m: robust_scale([v for e in explanations for v in _values(e, f)]) for m, (f, _, _) in METRICS.items()}


def _values(e: Explanation, field: str) -> List[float]:
    """A per-token list of ``e``; NaN for each token where it was not computed (self-certainty, by older callers)."""
    values = getattr(e, field)
    return list(values) if values is not None else [math.nan] * len(e.tokens)


def visible_whitespace(text: str) -> str:
    """``text`` with spaces, tabs, newlines and other control characters shown (for hover details)."""
    if text == "":
        return "(empty: part of a character the next tokens complete)"
    out = []
    for ch in text:
        if ch == " ":
            out.append("\u2423")  # open box
        elif ch == "\n":
            out.append("\u21b5")  # downwards arrow with corner leftwards
        elif ch == "\t":
            out.append("\u21e5")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 32 or 0x7F <= ord(ch) < 0xA0:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def _num(x: float, fmt: str = ".4f") -> str:
    return format(x, fmt) if math.isfinite(x) else str(x)


def _totals(e: Explanation) -> List[Tuple[str, str]]:
    other = ("sum reward", _num(e.reward_sum)) if e.reduce == "mean" else ("mean reward", _num(e.reward_mean))
    totals = [(f"reward ({e.reduce})", _num(e.reward)), other, ("logprob", _num(e.logprob)),
              ("tokens", str(e.num_tokens))]
    if e.self_certainty is not None:
        totals.append(("self-certainty", _num(e.self_certainty)))
    return totals


# ------------------------------------------------------------------------------------------------ HTML

_CSS = """
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;padding:16px 20px 90px;
  color:#111;background:#fafafa}
h1{font-size:18px;margin:0 0 10px}
h2{font-size:15px;margin:0 0 6px}
.bar{display:flex;flex-wrap:wrap;gap:14px;align-items:center;margin-bottom:12px}
.metric button{margin-left:4px;font:inherit;padding:3px 10px;border:1px solid #999;background:#fff;border-radius:4px;
  cursor:pointer}
.metric button.on{background:#222;color:#fff;border-color:#222}
.legend{display:none;align-items:center;gap:6px;font-size:12px}
.legend.on{display:flex}
.legend .ramp{width:180px;height:12px;border:1px solid #bbb}
.prompt{background:#eef0f3;border:1px solid #d6d9de;border-radius:6px;padding:8px 10px;margin:0 0 14px;
  white-space:pre-wrap;word-break:break-word;font:13px/1.45 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;
  max-height:260px;overflow:auto}
.label{font-size:12px;color:#555;margin-bottom:3px}
.grid{display:grid;gap:14px}
.card{background:#fff;border:1px solid #d6d9de;border-radius:6px;padding:10px 12px;min-width:0}
.totals{display:flex;flex-wrap:wrap;gap:4px 14px;font-size:12px;color:#333;margin-bottom:8px}
.totals b{font-weight:600}
.tokens{white-space:pre-wrap;word-break:break-word;font:13px/1.7 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
.tok{border-radius:2px;cursor:default;box-shadow:inset -1px 0 rgba(0,0,0,.12)}
.tok:hover{outline:2px solid #000}
.tok.nl::before{content:"\\21b5";opacity:.55}
.tok.empty::before{content:"\\00b7";opacity:.55}
#hover{position:fixed;right:12px;bottom:12px;background:#fff;border:1px solid #888;border-radius:6px;padding:6px 10px;
  font:12px/1.5 ui-monospace,Menlo,Consolas,monospace;box-shadow:0 2px 8px rgba(0,0,0,.15);min-width:220px;
  display:none}
#hover.on{display:block}
#hover td{padding:0 8px 0 0}
"""

_JS = """
(function(){
  var toks = document.querySelectorAll('.tok');
  function colour(metric){
    for (var i = 0; i < toks.length; i++){
      var c = toks[i].getAttribute('data-' + metric).split(' ');
      toks[i].style.background = c[0]; toks[i].style.color = c[1];
    }
    var buttons = document.querySelectorAll('.metric button');
    for (var j = 0; j < buttons.length; j++){
      buttons[j].className = buttons[j].getAttribute('data-metric') === metric ? 'on' : '';
    }
    var legends = document.querySelectorAll('.legend');
    for (var k = 0; k < legends.length; k++){
      legends[k].className = 'legend' + (legends[k].getAttribute('data-metric') === metric ? ' on' : '');
    }
  }
  var bar = document.querySelector('.metric');
  if (bar) bar.addEventListener('click', function(ev){
    var m = ev.target.getAttribute && ev.target.getAttribute('data-metric');
    if (m) colour(m);
  });
  var panel = document.getElementById('hover');
  var fields = ['t', 'id', 'r', 'lp', 'v', 'h', 'sc'];
  document.addEventListener('mouseover', function(ev){
    var t = ev.target;
    if (!t.classList || !t.classList.contains('tok')) { panel.className = ''; return; }
    for (var i = 0; i < fields.length; i++){
      document.getElementById('hv-' + fields[i]).textContent = t.getAttribute('data-' + fields[i]);
    }
    panel.className = 'on';
  });
  // a page opened as page.html#entropy (or #logprob) starts coloured by that
  var start = location.hash.slice(1);
  if (start && document.querySelector('.metric button[data-metric="' + start + '"]')) colour(start);
  document.body.setAttribute('data-ready', '1');
})();
"""


def _legend(metric: str, scale: float, shown: bool) -> str:
    kind, name = METRICS[metric][1], METRICS[metric][2]
    if kind == "diverging":
        ramp = f"linear-gradient(to right,{_hex(_NEGATIVE)},#ffffff,{_hex(_POSITIVE)})"
        left, mid, right = _num(-scale, ".3g"), "white: 0", _num(scale, ".3g")
    elif kind == "low":
        ramp = f"linear-gradient(to right,{_hex(_NEGATIVE)},#ffffff)"
        left, mid, right = _num(-scale, ".3g"), "", "0"
    else:
        ramp = f"linear-gradient(to right,#ffffff,{_hex(_HIGH)})"
        left, mid, right = "0", "", _num(scale, ".3g")
    note = (f"{mid}; " if mid else "") + f"full colour at the {ROBUST_PERCENTILE:g}th percentile of |{name}|"
    return (
        f'<div class="legend{" on" if shown else ""}" data-metric="{metric}"><span>{html.escape(name)}:</span>'
        f"<span>{html.escape(left)}</span><span class=\"ramp\" style=\"background:{ramp}\"></span>"
        f"<span>{html.escape(right)}</span><span style=\"color:#666\">({html.escape(note)})</span></div>"
    )


def _token_span(e: Explanation, i: int, scales: Dict[str, float], metric: str) -> str:
    piece = e.tokens[i]
    values = {"r": e.token_rewards[i], "lp": e.token_logprobs[i], "v": e.token_values[i], "h": e.token_entropies[i],
              "sc": _values(e, "token_self_certainty")[i]}
    colours = {m: metric_color(m, _values(e, f)[i], scales[m]) for m, (f, _, _) in METRICS.items()}
    shown = visible_whitespace(piece)
    title = (f"{shown}\nid {e.token_ids[i]}\nreward {_num(values['r'], '+.4f')}\nlog-prob {_num(values['lp'])}\n"
             f"value {_num(values['v'])}\nentropy {_num(values['h'])}\nself-certainty {_num(values['sc'])}")
    classes = "tok" + (" nl" if "\n" in piece else "") + (" empty" if piece == "" else "")
    bg, fg = colours[metric]
    attrs = [
        f'class="{classes}"', f'style="background:{_hex(bg)};color:{_hex(fg)}"',
        f'title="{html.escape(title)}"', f'data-t="{html.escape(shown)}"', f'data-id="{e.token_ids[i]}"',
        f'data-r="{_num(values["r"], "+.4f")}"', f'data-lp="{_num(values["lp"])}"', f'data-v="{_num(values["v"])}"',
        f'data-h="{_num(values["h"])}"', f'data-sc="{_num(values["sc"])}"',
    ]
    attrs += [f'data-{m}="{_hex(b)} {_hex(f)}"' for m, (b, f) in colours.items()]
    return f"<span {' '.join(attrs)}>{html.escape(piece)}</span>"


def render_html(explanations: Sequence[Explanation], *, title: str = "endokern explain", subtitle: Optional[str] = None,
                metric: str = "reward") -> str:
    """One self-contained HTML page (inline CSS and JS, no external resource) of the explained responses:
    the prompt, then each response's tokens coloured by ``metric`` (reward, logprob or entropy; buttons on the
    page switch), with its totals; two or more responses sit side by side. Hovering a token shows its text
    (whitespace made visible), id, reward, log-prob, value and entropy. Opened as ``page.html#entropy`` (or
    ``#logprob``) the page starts coloured by that metric."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {tuple(METRICS)}, got {metric!r}")
    explanations = list(explanations)
    if not explanations:
        raise ValueError("render_html needs at least one explanation")
    scales = _scales(explanations)
    shared_prompt = len({e.prompt for e in explanations}) == 1
    columns = min(len(explanations), 3)
    parts = [
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if subtitle:
        parts.append(f'<div class="label">{html.escape(subtitle)}</div>')
    on = ' class="on"'
    buttons = "".join(
        f'<button type="button" data-metric="{m}"{on if m == metric else ""}>{html.escape(name)}</button>'
        for m, (_, _, name) in METRICS.items()
    )
    parts.append(f'<div class="bar"><div class="metric">colour by: {buttons}</div>')
    parts += [_legend(m, scales[m], m == metric) for m in METRICS]
    parts.append("</div>")
    if shared_prompt:
        parts.append(f'<div class="label">prompt</div><div class="prompt">{html.escape(explanations[0].prompt)}</div>')
    parts.append(f'<div class="grid" style="grid-template-columns:repeat({columns},minmax(0,1fr))">')
    for e in explanations:
        parts.append(f'<div class="card"><h2>{html.escape(e.label)}</h2>')
        if not shared_prompt:
            parts.append(f'<div class="label">prompt</div><div class="prompt">{html.escape(e.prompt)}</div>')
        totals = "".join(f"<span>{html.escape(k)} <b>{html.escape(v)}</b></span>" for k, v in _totals(e))
        parts.append(f'<div class="totals">{totals}</div><div class="tokens">')
        parts += [_token_span(e, i, scales, metric) for i in range(len(e.tokens))]
        parts.append("</div></div>")
    parts.append("</div>")
    rows = "".join(f'<tr><td>{name}</td><td id="hv-{key}"></td></tr>'
                   for key, name in (("t", "token"), ("id", "id"), ("r", "reward"), ("lp", "log-prob"),
                                     ("v", "value"), ("h", "entropy"), ("sc", "self-certainty")))
    parts.append(f'<div id="hover"><table>{rows}</table></div>')
    parts.append(f"<script>{_JS}</script></body></html>\n")
    return "".join(parts)


# ------------------------------------------------------------------------------------------------ terminal

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def render_terminal(explanations: Sequence[Explanation], *, color: bool = True, metric: str = "reward") -> str:
    """The responses as text, each token's background coloured by ``metric`` (24-bit ANSI colours), each
    followed by a line of totals; ``color=False`` gives the same text without escape codes."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {tuple(METRICS)}, got {metric!r}")
    explanations = list(explanations)
    scales = _scales(explanations)
    field, kind, name = METRICS[metric]
    shared_prompt = len({e.prompt for e in explanations}) == 1
    lines: List[str] = []
    if color and explanations:
        s = _num(scales[metric], ".3g")
        low = _num(-scales[metric], ".3g")
        key = {"diverging": f"red < 0 < blue, full colour at \u00b1{s}", "low": f"white 0 .. red {low}",
               "high": f"white 0 .. purple {s}"}[kind]
        lines.append(f"colour: {name} ({key}; {ROBUST_PERCENTILE:g}th percentile of |{name}|)")
    if shared_prompt and explanations:
        lines.append(f"prompt: {explanations[0].prompt}")
    for e in explanations:
        lines.append(f"--- {e.label} ---")
        if not shared_prompt:
            lines.append(f"prompt: {e.prompt}")
        if color:
            out = []
            for piece, value in zip(e.tokens, _values(e, field)):
                bg, fg = metric_color(metric, value, scales[metric])
                start = "\x1b[38;2;%d;%d;%dm\x1b[48;2;%d;%d;%dm" % (fg + bg)
                # colour each line of a piece apart so no background runs past a line break
                out.append("\n".join(f"{start}{seg}\x1b[0m" if seg else "" for seg in piece.split("\n")))
            lines.append("".join(out))
        else:
            lines.append("".join(e.tokens))
        lines.append("  ".join(f"{k} {v}" for k, v in _totals(e)))
    return "\n".join(lines) + "\n"
