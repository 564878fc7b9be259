"""Tokenization of SPEC section 3: plain, chat, auto, messages, and the errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from model_utils import FIXTURE, assert_close_to_oracle, fixture_model, oracle

from endokern import EndoRM
from endokern.tokenization import EncodeError, Encoded, Encoder, TextExample

# A small ChatML-like template: the assistant turn ends with </s> (the fixture's EOS), then a newline.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<s>' if loop.first else '' }}{{ m['role'] }}: {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}</s>{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("chat-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{FIXTURE}/{name}", folder / name)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return AutoTokenizer.from_pretrained(folder)


def test_plain_keeps_bos_on_prompt_and_nothing_on_response():
    _, tok = fixture_model()
    enc = Encoder(tok, "auto")
    assert enc.template == "plain"  # the fixture has no chat template
    (out,) = enc.encode([TextExample("Once upon a time", " there was a cat")])
    assert out.prompt_ids == tok("Once upon a time")["input_ids"] and out.prompt_ids[0] == tok.bos_token_id
    assert out.response_ids == tok(" there was a cat", add_special_tokens=False)["input_ids"]
    assert tok.eos_token_id not in out.response_ids
    (with_eos,) = Encoder(tok, "plain", append_eos=True).encode([TextExample("Once", " upon")])
    assert with_eos.response_ids[-1] == tok.eos_token_id


def test_an_empty_prompt_scores_from_the_bos():
    _, tok = fixture_model()
    (out,) = Encoder(tok, "plain").encode([TextExample("", " a cat")])
    assert out.prompt_ids == [tok.bos_token_id]


def test_plain_errors_do_not_stop_the_others():
    _, tok = fixture_model()
    out = Encoder(tok, "plain").encode(
        [TextExample("a", ""), TextExample("a", " b"), TextExample(None, " b"), TextExample(messages=[])]
    )
    assert isinstance(out[0], EncodeError) and "empty response" in str(out[0])
    assert isinstance(out[1], Encoded)
    assert isinstance(out[2], EncodeError) and "missing prompt" in str(out[2])
    assert isinstance(out[3], EncodeError) and "chat template" in str(out[3])


def test_a_prompt_of_zero_tokens_is_an_error(tmp_path):
    from transformers import AutoTokenizer

    spec = json.loads(open(f"{FIXTURE}/tokenizer.json").read())
    spec["post_processor"] = None  # a tokenizer that adds no BOS
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    shutil.copy(f"{FIXTURE}/tokenizer_config.json", tmp_path / "tokenizer_config.json")
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok("")["input_ids"] == []
    (out,) = Encoder(tok, "plain").encode([TextExample("", " a cat")])
    assert isinstance(out, EncodeError) and "prompt has no tokens" in str(out)


def test_chat_splits_at_the_prompt_render_and_drops_what_follows_the_turn(chat_tokenizer):
    tok = chat_tokenizer
    enc = Encoder(tok, "auto")
    assert enc.template == "chat"
    (out,) = enc.encode([TextExample("Tell a story.", "Once upon a time.")])
    prompt_text = tok.apply_chat_template([{"role": "user", "content": "Tell a story."}], tokenize=False,
                                          add_generation_prompt=True)
    assert prompt_text == "<s>user: Tell a story.\nassistant:"
    assert out.prompt_ids == tok(prompt_text, add_special_tokens=False)["input_ids"]
    full = tok(tok.apply_chat_template([{"role": "user", "content": "Tell a story."},
                                        {"role": "assistant", "content": "Once upon a time."}], tokenize=False),
               add_special_tokens=False)["input_ids"]
    assert full[: len(out.prompt_ids)] == out.prompt_ids
    # The response ends with the end-of-turn token; the newline the template adds after it is dropped.
    assert out.response_ids[-1] == tok.eos_token_id
    assert out.prompt_ids + out.response_ids == full[: full.index(tok.eos_token_id, len(out.prompt_ids)) + 1]
    assert len(full) > len(out.prompt_ids) + len(out.response_ids)


def test_messages_score_the_last_assistant_turn_with_a_system_prompt(chat_tokenizer):
    messages = [
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "A story?"},
        {"role": "assistant", "content": "Once upon a time."},
    ]
    (out,) = Encoder(chat_tokenizer, "chat", system="Be kind.").encode([TextExample(messages=messages)])
    expected_prompt = "<s>system: Be kind.\nuser: Hi.\nassistant: Hello.</s>\nuser: A story?\nassistant:"
    assert out.prompt_ids == chat_tokenizer(expected_prompt, add_special_tokens=False)["input_ids"]
    response = chat_tokenizer(expected_prompt + " Once upon a time.</s>", add_special_tokens=False)["input_ids"]
    assert out.prompt_ids + out.response_ids == response
    bad = Encoder(chat_tokenizer, "chat").encode(
        [TextExample(messages=messages[:-1]), TextExample(messages=[messages[1]]), TextExample(messages=[{"x": 1}])]
    )
    assert all(isinstance(b, EncodeError) for b in bad)
    assert "last message must be the assistant" in str(bad[0])


def test_a_render_that_does_not_start_with_the_prompt_render_is_an_error(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(FIXTURE)
    # A template that changes the header once an assistant turn exists: the two renders disagree.
    tok.chat_template = (
        "{% if messages[-1]['role'] == 'assistant' %}Chat:\n{% else %}Talk:\n{% endif %}"
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    (out,) = Encoder(tok, "chat").encode([TextExample("Hi", "Hello")])
    assert isinstance(out, EncodeError) and "does not start with the render of the prompt" in str(out)


def test_a_whitespace_only_response_that_the_template_drops_says_so(gen):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(FIXTURE)
    # Templates that skip empty turns are common: a whitespace-only answer then vanishes from the render.
    tok.chat_template = (
        "{% for m in messages %}{% if m['content'].strip() %}{{ m['role'] }}: {{ m['content'] }}{{ '\\n' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    )
    blank = "".join(" \n\t"[int(i)] for i in torch.randint(0, 3, (int(torch.randint(1, 6, (1,), generator=gen)),),
                                                              generator=gen))
    blank_out, real = Encoder(tok, "chat").encode([TextExample("Hi", blank), TextExample("Hi", "Hello")])
    assert isinstance(blank_out, EncodeError) and "whitespace-only response" in str(blank_out)
    assert repr(blank) in str(blank_out)
    assert isinstance(real, Encoded)  # the same template scores a real answer


def test_chat_without_a_template_is_refused():
    _, tok = fixture_model()
    with pytest.raises(ValueError, match="no chat template"):
        Encoder(tok, "chat")
    with pytest.raises(ValueError, match="template must be one of"):
        Encoder(tok, "fancy")


def test_chat_scoring_end_to_end_matches_oracle(chat_tokenizer):
    model, _ = fixture_model()
    rm = EndoRM(model, chat_tokenizer)
    prompts, responses = ["Tell a story.", "Say hi."], ["Once upon a time there was a cat.", "Hi!"]
    results = rm.score(prompts, responses, per_token=True)
    encoded = rm.encoder("chat").encode([TextExample(p, r) for p, r in zip(prompts, responses)])
    expected = oracle(model, [e.prompt_ids for e in encoded], [e.response_ids for e in encoded])
    assert_close_to_oracle(results, expected, rtol=1e-5)


def test_an_empty_response_is_its_end_of_turn_token_under_chat_and_an_error_under_plain(chat_tokenizer):
    model, tok = fixture_model()
    rm = EndoRM(model, chat_tokenizer)
    prompts = ["Say nothing.", "Tell a story."]
    results = rm.score(prompts, ["", "Once there was a cat."], per_token=True)
    (empty, _) = encoded = rm.encoder("chat").encode([TextExample(p, r) for p, r in
                                                      zip(prompts, ["", "Once there was a cat."])])
    assert empty.response_ids[-1] == chat_tokenizer.eos_token_id  # the answer is the end of the turn
    assert results[0].num_tokens == len(empty.response_ids) <= 2  # ("</s>", after the template's space)
    expected = oracle(model, [e.prompt_ids for e in encoded], [e.response_ids for e in encoded])
    assert_close_to_oracle(results, expected, rtol=1e-5)
    with pytest.raises(EncodeError, match="example 1: empty response: under the plain template"):
        EndoRM(model, tok).score(["a", "b"], ["c", ""])
    (eos_only,) = Encoder(tok, "plain", append_eos=True).encode([TextExample("a", "")])
    assert eos_only.response_ids == [tok.eos_token_id]
