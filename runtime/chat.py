"""A multi-turn chat session over an `LLM`: templates, history trimming, streaming.

History is trimmed by tokens, not characters (Linly's demo cut characters and
kept the oldest part): the system prompt always stays, then as many of the
newest turns as fit in the context window minus the room kept for the reply.
"""
from __future__ import annotations

from collections.abc import Iterator

from .chat_template import preset_stop_strings, render_chat
from .errors import ContextLengthError, LingliError
from .llm import LLM, RequestOutput
from .sampler import SamplingParams


class ChatSession:
    def __init__(self, llm: LLM, params: SamplingParams, system: str | None = None,
                 preset: str | None = None, max_history_tokens: int | None = None) -> None:
        if llm.tokenizer is None:
            raise LingliError(f"{llm.path} has no tokenizer; chat needs one")
        tok = llm.tokenizer
        if preset is None and not tok.chat_template:
            preset = "raw"
        self.llm, self.system, self.preset = llm, system, preset
        self.template = None if preset else tok.chat_template
        stops = list(params.stop or []) + (preset_stop_strings(preset) if preset else [])
        self.params = _with_stop(params, stops)
        room = self.llm.max_model_len - params.max_tokens
        self.max_history_tokens = min(max_history_tokens or room, room)
        if self.max_history_tokens < 1:
            raise LingliError(f"max_tokens={params.max_tokens} leaves no room for the "
                              f"conversation in a {self.llm.max_model_len}-token context")
        self.turns: list[dict] = []          # user/assistant messages, oldest first

    def reset(self) -> None:
        self.turns.clear()

    def messages(self, turns: list[dict]) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + turns

    def prompt_ids(self, turns: list[dict]) -> list[int]:
        return chat_prompt_ids(self.llm.tokenizer, self.messages(turns), self.template,
                               self.preset)

    def trimmed(self, turns: list[dict]) -> tuple[list[dict], list[int]]:
        """Drop the oldest turns until the rendered prompt fits; returns turns and ids."""
        start = 0
        while True:
            ids = self.prompt_ids(turns[start:])
            if len(ids) <= self.max_history_tokens:
                return turns[start:], ids
            if start >= len(turns) - 1:
                raise ContextLengthError(
                    f"the message alone is {len(ids)} tokens; at most "
                    f"{self.max_history_tokens} fit with room for a {self.params.max_tokens}-"
                    "token reply")
            start += 2 if turns[start]["role"] == "user" and start + 2 < len(turns) else 1

    def send(self, user_text: str, output: RequestOutput | None = None) -> Iterator[str]:
        """Stream the assistant's reply to `user_text`; the turn is kept once it finishes."""
        turns, ids = self.trimmed(self.turns + [{"role": "user", "content": user_text}])
        out = output if output is not None else RequestOutput(prompt_token_ids=[])
        yield from self.llm.stream(ids, self.params, output=out)
        self.turns = turns + [{"role": "assistant", "content": out.text.strip()}]


def chat_prompt_ids(tok, messages: list[dict], template: str | None,
                    preset: str | None) -> list[int]:
    """Render `messages` (Jinja `template` or `preset`) and tokenize, BOS once."""
    text = render_chat(messages, template=template, preset=preset, add_generation_prompt=True,
                       bos_token=tok.bos_token or "", eos_token=tok.eos_token or "")
    # A template that writes the BOS itself must not get a second one.
    add_bos = None if not (tok.bos_token and text.startswith(tok.bos_token)) else False
    return tok.encode(text, add_bos=add_bos)


def _with_stop(params: SamplingParams, stops: list[str]) -> SamplingParams:
    from dataclasses import replace

    unique = list(dict.fromkeys(s for s in stops if s))
    return replace(params, stop=unique)
