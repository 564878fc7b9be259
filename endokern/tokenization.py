"""Text to token ids with the response span, as the README's 'Scoring from Python' defines it.

``plain``: prompt ids = ``tokenizer(prompt)`` with the tokenizer's own special tokens (a BOS where it adds
one), response ids = ``tokenizer(response, add_special_tokens=False)``, no EOS unless ``append_eos``.

``chat``: prompt ids = the chat template over the conversation (an optional system message, then the user
turn, or the ``messages`` before the last assistant turn) with the generation prompt; full ids = the template
over the conversation plus the assistant turn; response ids = the full ids after the prompt ids (an error if
the full render does not start with the prompt render), cut after the model's first end-of-turn token.

``auto``: ``chat`` when the tokenizer has a chat template, else ``plain``.

Texts are rendered one by one (the template is Jinja) and tokenized in batches by the fast tokenizer.
An empty response under ``chat`` is the end-of-turn token alone (a model that answers nothing) and is scored; under
``plain`` it has no tokens and is an error unless ``append_eos``. A problem with one example (an empty plain response,
a prompt of zero tokens, a render mismatch, a whitespace-only response the template drops) is an
:class:`EncodeError` in that example's slot, so a large run can report it and go on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, List, Mapping, Optional, Sequence, Union

__all__ = ["EncodeError", "Encoded", "Encoder", "TEMPLATES", "TextExample", "document_start", "end_of_turn_ids",
           "has_chat_template", "resolve_template"]

TEMPLATES = ("auto", "plain", "chat")


class EncodeError(ValueError):
    """An example that cannot be turned into (prompt ids, response ids)."""


@dataclass(frozen=True)
class Encoded:
    """One example as token ids: ``p = len(prompt_ids) >= 1`` and ``H = len(response_ids) >= 1``."""

    prompt_ids: List[int]
    response_ids: List[int]

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


Messages = Sequence[Mapping[str, Any]]


@dataclass(frozen=True)
class TextExample:
    """One example as text: a prompt and a response, or a conversation whose last turn is the response. Token ids
    stand in for text where a caller has them (what a policy sampled): ``response_ids`` are scored as they are after
    the prompt (``prompt_ids`` as they are, or ``prompt`` rendered by the template as for a text response)."""

    prompt: Optional[str] = None
    response: Optional[str] = None
    messages: Optional[Messages] = None
    prompt_ids: Optional[Sequence[int]] = None
    response_ids: Optional[Sequence[int]] = None


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_template(tokenizer, template: str) -> str:
    """``plain`` or ``chat`` for ``template`` in :data:`TEMPLATES`; an error for chat without a template."""
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    if template == "auto":
        return "chat" if has_chat_template(tokenizer) else "plain"
    if template == "chat" and not has_chat_template(tokenizer):
        raise ValueError("template='chat' but the tokenizer has no chat template; use template='plain'")
    return template


def end_of_turn_ids(tokenizer, generation_config=None) -> List[int]:
    """The ids that end an assistant turn: the tokenizer's EOS and the generation config's EOS ids."""
    ids = set()
    for source in (getattr(tokenizer, "eos_token_id", None), getattr(generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return sorted(ids)


class Encoder:
    """Turns :class:`TextExample` lists into :class:`Encoded` lists (or :class:`EncodeError` per example)."""

    def __init__(
        self,
        tokenizer,
        template: str = "auto",
        *,
        system: Optional[str] = None,
        append_eos: bool = False,
        end_of_turn: Optional[Iterable[int]] = None,
    ):
        self.tokenizer = tokenizer
        self.template = resolve_template(tokenizer, template)
        self.system = system
        self.append_eos = append_eos
        if append_eos and tokenizer.eos_token_id is None:
            raise ValueError("append_eos=True but the tokenizer has no EOS token")
        self.end_of_turn = set(end_of_turn) if end_of_turn is not None else set(end_of_turn_ids(tokenizer))

    def max_chars(self, max_tokens: int) -> int:
        """A bound on the characters of a text of at most ``max_tokens`` tokens: ``max_tokens`` times the longest
        token of the vocabulary (plus the chat template's own text). A longer text cannot fit, so it can be refused
        before the tokenizer turns it all into ids."""
        if not hasattr(self, "_longest_token"):
            vocab = self.tokenizer.get_vocab() if hasattr(self.tokenizer, "get_vocab") else {}
            self._longest_token = max((len(t) for t in vocab), default=0) or 64
        return max_tokens * self._longest_token + 4096

    def encode(self, examples: Sequence[TextExample]) -> List[Union[Encoded, EncodeError]]:
        by_ids = [i for i, ex in enumerate(examples) if ex.response_ids is not None]
        if not by_ids:
            return self._encode_text(examples)
        out: List[Union[Encoded, EncodeError, None]] = [None] * len(examples)
        by_text = [i for i, ex in enumerate(examples) if ex.response_ids is None]
        for i, encoded in zip(by_text, self._encode_text([examples[i] for i in by_text])):
            out[i] = encoded
        for i, encoded in zip(by_ids, self._encode_ids([examples[i] for i in by_ids])):
            out[i] = encoded
        return out  # type: ignore[return-value]

    def _encode_text(self, examples: Sequence[TextExample]) -> List[Union[Encoded, EncodeError]]:
        if self.template == "chat":
            return self._encode_chat(examples)
        return self._encode_plain(examples)

    def _encode_ids(self, examples: Sequence[TextExample]) -> List[Union[Encoded, EncodeError]]:
        """Examples whose response is token ids: the prompt as ids, or its text as the template renders a prompt
        (plain: the tokenizer's own special tokens; chat: the conversation with the generation prompt)."""
        out: List[Union[Encoded, EncodeError, None]] = [None] * len(examples)
        texts, todo = [], []
        for i, ex in enumerate(examples):
            try:
                response_ids = _ids(ex.response_ids, "response_ids")
                if ex.response is not None or ex.messages is not None:
                    raise EncodeError("give the response as text or as response_ids, not both")
                if ex.prompt_ids is not None:
                    if ex.prompt is not None:
                        raise EncodeError("give the prompt as text or as prompt_ids, not both")
                    out[i] = _checked(_ids(ex.prompt_ids, "prompt_ids"), response_ids)
                    continue
                _check_text(ex.prompt, "prompt", allow_empty=True)
                if self.template == "chat":
                    system = [] if self.system is None else [{"role": "system", "content": self.system}]
                    texts.append(self._render(system + [{"role": "user", "content": ex.prompt}], True))
                else:
                    if self.system is not None:
                        raise EncodeError("a system prompt needs a chat template (template='chat')")
                    texts.append(ex.prompt)
            except EncodeError as err:
                out[i] = err
                continue
            except Exception as err:  # a template that raises on this conversation
                out[i] = EncodeError(f"the chat template cannot render this prompt: {err}")
                continue
            todo.append((i, response_ids))
        prompts = self._tokenize(texts, special=self.template != "chat")
        for (i, response_ids), prompt_ids in zip(todo, prompts):
            out[i] = _checked(prompt_ids, response_ids)
        return out  # type: ignore[return-value]

    def _encode_plain(self, examples: Sequence[TextExample]) -> List[Union[Encoded, EncodeError]]:
        out: List[Union[Encoded, EncodeError, None]] = [None] * len(examples)
        todo = []
        for i, ex in enumerate(examples):
            try:
                if ex.messages is not None:
                    raise EncodeError("a 'messages' conversation needs a chat template (template='chat')")
                _check_text(ex.prompt, "prompt", allow_empty=True)
                if ex.response == "" and not self.append_eos:
                    raise EncodeError("empty response: under the plain template it has no tokens to score (pass "
                                      "--append-eos to score the EOS, or use a chat template, where it is the "
                                      "end-of-turn token)")
                _check_text(ex.response, "response", allow_empty=True)
                if self.system is not None:
                    raise EncodeError("a system prompt needs a chat template (template='chat')")
            except EncodeError as err:
                out[i] = err
                continue
            todo.append(i)
        prompts = self._tokenize([examples[i].prompt for i in todo], special=True)
        responses = self._tokenize([examples[i].response for i in todo], special=False)
        eos = [self.tokenizer.eos_token_id] if self.append_eos else []
        for i, prompt_ids, response_ids in zip(todo, prompts, responses):
            out[i] = _checked(prompt_ids, response_ids + eos)
        return out  # type: ignore[return-value]

    def _encode_chat(self, examples: Sequence[TextExample]) -> List[Union[Encoded, EncodeError]]:
        out: List[Union[Encoded, EncodeError, None]] = [None] * len(examples)
        todo, prompt_texts, full_texts = [], [], []
        for i, ex in enumerate(examples):
            try:
                conversation, response = self._conversation(ex)
                prompt_texts.append(self._render(conversation, generation_prompt=True))
                full_texts.append(self._render(list(conversation) + [{"role": "assistant", "content": response}]))
            except EncodeError as err:
                out[i] = err
                continue
            except Exception as err:  # a template that raises on this conversation (e.g. role order rules)
                out[i] = EncodeError(f"the chat template cannot render this conversation: {err}")
                continue
            todo.append(i)
        prompts = self._tokenize(prompt_texts, special=False)
        fulls = self._tokenize(full_texts, special=False)
        for i, prompt_ids, full_ids in zip(todo, prompts, fulls):
            response_text = self._conversation(examples[i])[1]
            if full_ids[: len(prompt_ids)] != prompt_ids and response_text and not response_text.strip():
                out[i] = EncodeError(
                    f"a whitespace-only response ({response_text!r}): the chat template does not keep it as a turn "
                    "of its own (the render with it does not start with the prompt's); strip it to score an empty "
                    "answer, or use template='plain'"
                )
                continue
            if full_ids[: len(prompt_ids)] != prompt_ids:
                out[i] = EncodeError(
                    "the chat render of the conversation with the response does not start with the render of the "
                    "prompt (the template or the tokenizer merges across the boundary); use template='plain'"
                )
                continue
            response_ids = full_ids[len(prompt_ids) :]
            for j, token in enumerate(response_ids):
                if token in self.end_of_turn:
                    response_ids = response_ids[: j + 1]  # drop what the template adds after the turn's end
                    break
            out[i] = _checked(prompt_ids, response_ids)
        return out  # type: ignore[return-value]

    def _conversation(self, ex: TextExample):
        system = [] if self.system is None else [{"role": "system", "content": self.system}]
        if ex.messages is not None:
            if ex.prompt is not None or ex.response is not None:
                raise EncodeError("give either 'messages' or 'prompt' and 'response', not both")
            messages = list(ex.messages)
            if not messages:
                raise EncodeError("'messages' is empty")
            for m in messages:
                if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or "content" not in m:
                    raise EncodeError("each message needs a 'role' string and a 'content'")
            if messages[-1]["role"] != "assistant":
                raise EncodeError("the last message must be the assistant's (the response to score)")
            if len(messages) < 2:
                raise EncodeError("'messages' needs at least one turn before the assistant's response")
            response = messages[-1]["content"]
            _check_text(response, "response", allow_empty=True)  # an empty answer is its end-of-turn token
            head = [dict(m) for m in messages[:-1]]
            if system and head[0]["role"] != "system":
                head = system + head
            return head, response
        _check_text(ex.prompt, "prompt", allow_empty=True)
        _check_text(ex.response, "response", allow_empty=True)  # an empty answer is its end-of-turn token
        return system + [{"role": "user", "content": ex.prompt}], ex.response

    def _render(self, conversation, generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=generation_prompt
        )

    def _tokenize(self, texts: List[str], special: bool) -> List[List[int]]:
        if not texts:
            return []
        encoded = self.tokenizer(texts, add_special_tokens=special, return_attention_mask=False)
        return [list(ids) for ids in encoded["input_ids"]]


def _check_text(value, name: str, allow_empty: bool) -> None:
    if value is None:
        raise EncodeError(f"missing {name}")
    if not isinstance(value, str):
        raise EncodeError(f"{name} must be a string, got {type(value).__name__}")
    if not allow_empty and not value:
        raise EncodeError(f"empty {name}")


def document_start(tokenizer) -> str:
    """The prompt text of a row with no prompt, so that its text is scored from the model's beginning of sequence
    under the plain template: ``""`` when the tokenizer adds a BOS of its own, else its BOS token, else its EOS token
    (the separator between documents of models trained without a BOS)."""
    if tokenizer("", add_special_tokens=True)["input_ids"]:
        return ""
    for token in (tokenizer.bos_token, tokenizer.eos_token):
        if token and len(tokenizer(token, add_special_tokens=True)["input_ids"]) == 1:
            return token
    raise ValueError("the tokenizer adds no BOS and has no BOS or EOS token to start a text from: give the rows a "
                     "prompt")


def _ids(value, name: str) -> List[int]:
    """A list of token ids (ints >= 0); the model checks the vocabulary's end."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise EncodeError(f"{name} must be a list of integer token ids")
    if any(t < 0 for t in value):
        raise EncodeError(f"{name} holds a negative token id")
    return list(value)


def _checked(prompt_ids: List[int], response_ids: List[int]) -> Union[Encoded, EncodeError]:
    if not prompt_ids:
        return EncodeError("the prompt has no tokens (an empty prompt and a tokenizer that adds no BOS)")
    if not response_ids:
        return EncodeError("the response has no tokens")
    return Encoded(prompt_ids, response_ids)
