"""From a rendered `[INST] ... [/INST]` prompt to the exact text and token ids a model sees.

Two formats (option `chat_format`):

- ``template``: the prompt's parts become chat messages (``<<SYS>> ... <</SYS>>`` at the start of the ``[INST]``
  block -> a system message, the rest of the block -> the user message, whitespace around it stripped) and the
  tokenizer's own chat template renders them with the generation prompt (the assistant header) at the end.
- ``raw``: the paper's text as it is, ``[INST]...[/INST]`` and the line break after ``[/INST]`` included.

Token ids are always `bos + tokenizer(text, add_special_tokens=False)`: `bos` is the tokenizer's BOS when the
tokenizer adds one by itself and the text does not already start with it (chat templates such as Llama 3's write
``<|begin_of_text|>`` themselves) -- so there is exactly one BOS, never two.

Stop tokens: the template's end-of-turn token (found by rendering an assistant message and reading the special
token that follows it: ``<|im_end|>`` for ChatML/SmolLM2, ``<|eot_id|>`` for Llama 3), then every
`generation_config.eos_token_id`, then the tokenizer's EOS. The first one is the token that ends an answer in
constrained decoding and scoring.

Duck-typed on a Hugging Face tokenizer: this module imports neither torch nor transformers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from clfbench.engine.types import ClfbenchError

ChatFormatName = Literal["template", "raw"]
INST_OPEN, INST_CLOSE = "[INST]", "[/INST]"
SYS_OPEN, SYS_CLOSE = "<<SYS>>", "<</SYS>>"
MARKERS = (INST_OPEN, INST_CLOSE, SYS_OPEN, SYS_CLOSE)
_PROBE = "Zqxj7 probe"


def split_inst(prompt: str) -> tuple[str | None, str]:
    """(system text or None, user text) of an `[INST] ... [/INST]` prompt.

    The first ``[INST]`` and the last ``[/INST]`` delimit the turn; a ``<<SYS>>...<</SYS>>`` block right at its
    start is the system message. Documents cannot contain these markers (they are neutralised before rendering).
    """
    start, end = prompt.find(INST_OPEN), prompt.rfind(INST_CLOSE)
    if start < 0 or end < start:
        raise ClfbenchError("a prompt for chat_format=template needs an [INST] ... [/INST] block")
    body = prompt[start + len(INST_OPEN) : end].strip()
    system = None
    if body.startswith(SYS_OPEN):
        close = body.find(SYS_CLOSE)
        if close < 0:
            raise ClfbenchError("<<SYS>> without <</SYS>> in the prompt")
        system = body[len(SYS_OPEN) : close].strip()
        body = body[close + len(SYS_CLOSE) :].strip()
    return system, body


def _special_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for token_id, token in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
        if getattr(token, "special", False):
            ids.add(int(token_id))
    return ids


def _special_strings(tokenizer) -> list[str]:
    strings = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values():
        if getattr(token, "special", False):
            strings.add(str(token.content if hasattr(token, "content") else token))
    return sorted((s for s in strings if s), key=len, reverse=True)


def _as_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


@dataclass
class ChatFormat:
    tokenizer: object
    mode: ChatFormatName
    generation_config: object | None = None
    bos: list[int] = field(default_factory=list)
    stop_ids: list[int] = field(default_factory=list)
    special_ids: set[int] = field(default_factory=set)
    special_strings: list[str] = field(default_factory=list)
    merged_system: bool = False  # the template refused a system message; it was put at the top of the user turn

    def __post_init__(self):
        if self.mode not in ("template", "raw"):
            raise ClfbenchError(f"chat_format must be 'template' or 'raw', got {self.mode!r}")
        tok = self.tokenizer
        if self.mode == "template" and not getattr(tok, "chat_template", None):
            raise ClfbenchError("this model's tokenizer has no chat template; use -o chat_format=raw")
        self.special_ids = _special_ids(tok)
        self.special_strings = _special_strings(tok)
        end_of_turn = self._end_of_turn() if self.mode == "template" or getattr(tok, "chat_template", None) else None
        eos = _as_list(getattr(self.generation_config, "eos_token_id", None)) + _as_list(tok.eos_token_id)
        order = ([end_of_turn] if self.mode == "template" and end_of_turn is not None else []) + eos
        if self.mode == "raw" and end_of_turn is not None:
            order.append(end_of_turn)  # a chat model may still end its turn the chat way
        self.stop_ids = list(dict.fromkeys(order))
        if not self.stop_ids:
            raise ClfbenchError("the model has no EOS or end-of-turn token to stop on")
        self.bos = self._bos()

    # ------------------------------------------------------------------------------------------- set-up

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
        if not isinstance(text, str):  # some versions return a list for a batch of one
            text = text[0]
        return text

    def _end_of_turn(self) -> int | None:
        try:
            text = self._render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}], False)
        except Exception:
            return None
        at = text.find(_PROBE)
        if at < 0:
            return None
        after = self.tokenizer(text[at + len(_PROBE):], add_special_tokens=False)["input_ids"]
        return int(after[0]) if after and int(after[0]) in self.special_ids else None

    def _bos(self) -> list[int]:
        tok = self.tokenizer
        bos_id = getattr(tok, "bos_token_id", None)
        if bos_id is None:
            return []
        with_special = tok("x", add_special_tokens=True)["input_ids"]
        without = tok("x", add_special_tokens=False)["input_ids"]
        adds_bos = bool(with_special) and with_special[0] == bos_id and (not without or without[0] != bos_id)
        if not adds_bos:
            return []
        if self.mode == "template":
            probe = self.text(f"{INST_OPEN}x{INST_CLOSE}")
            if tok.bos_token and probe.startswith(tok.bos_token):
                return []
        return [int(bos_id)]

    # ---------------------------------------------------------------------------------------------- use

    @property
    def stop_id(self) -> int:
        """The token that ends an answer (constrained decoding, scoring)."""
        return self.stop_ids[0]

    @property
    def forbidden(self) -> list[str]:
        """Strings a document must not contain as such: special tokens and the prompt's markers."""
        return list(self.special_strings) + list(MARKERS)

    def text(self, prompt: str) -> str:
        """The full text the model sees for a rendered prompt (without the BOS the tokenizer adds)."""
        if self.mode == "raw":
            return prompt
        system, user = split_inst(prompt)
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": user}]
        try:
            return self._render(messages, True)
        except Exception:
            if system is None:
                raise
            # Templates that refuse a system role (e.g. Gemma, older Mistral): system text tops the user turn.
            self.merged_system = True
            return self._render([{"role": "user", "content": f"{system}\n\n{user}"}], True)

    def encode(self, text: str) -> list[int]:
        return self.bos + list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of a piece of text, no BOS."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def last_special(self, text: str) -> int:
        """Where the last special-token string in `text` starts (-1: none). Special tokens are split off before
        pre-tokenisation, so text from there on tokenises the same whatever came before it."""
        best = -1
        for s in self.special_strings:
            at = text.rfind(s)
            if at > best:
                best = at
        return best
