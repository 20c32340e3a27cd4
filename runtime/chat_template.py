"""Chat prompts: the checkpoint's own Jinja template, or a named preset.

``render_chat(messages, template=...)`` renders a Hugging Face
``chat_template`` the way transformers does (sandboxed Jinja, trim_blocks,
lstrip_blocks, ``raise_exception``, ``tojson``, loop controls).

``render_chat(messages, preset=...)`` renders one of the prompt formats of
the 2023 Chinese chat models, whose checkpoints carry no template.  Exact
whitespace matters: these strings are what the models were trained on
(see DESIGN notes, anchors.md section 5):

=============== ==============================================================
chatml          ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` ... ``<|im_start|>assistant\\n``
linly           ``User:{q}\\n{a}\\n...User:{q}\\n``  (Linly-ChatFlow)
chinese-alpaca  ``{header}\\n\\n### Instruction:\\n\\n{q}\\n\\n### Response:\\n\\n{a}\\n\\n...``
belle           ``Human: \\n{q}\\n\\nAssistant: \\n{a}\\n\\n...``  (newer BELLE form)
billa           ``Human: {q}\\nAssistant: {a}\\n...``  (one space after ``Assistant:``)
ziya            ``<human>:{q}\\n<bot>:{a}\\n...``
firefly         ``<s>{q}</s></s>`` (v1, one turn); ``<s>q1</s>a1</s>q2</s>`` (multi-turn)
llama2          ``<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{q} [/INST] {a} </s>...``
raw             the system and user contents, concatenated
=============== ==============================================================

A system message, where a format has no slot for one, is put first on its own
line(s).  Each preset has stop strings (``preset_stop_strings``) that end the
answer when the model goes on to write the next turn itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Callable

__all__ = [
    "ChatPreset",
    "PRESETS",
    "list_presets",
    "preset_stop_strings",
    "render_chat",
    "validate_messages",
]

ROLES = ("system", "user", "assistant")

ALPACA_HEADER = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)


def validate_messages(messages: list[dict]) -> list[dict]:
    """Check that ``messages`` is a list of {role, content} dicts; ValueError naming the index."""
    if isinstance(messages, (str, bytes)) or not hasattr(messages, "__iter__"):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    messages = list(messages)
    if not messages:
        raise ValueError("messages is empty: give at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{i}]: role must be one of {', '.join(ROLES)}; got {role!r}")
        if not isinstance(m.get("content"), str):
            raise ValueError(
                f"messages[{i}]: content must be a str, got {type(m.get('content')).__name__}"
            )
    return messages


# --------------------------------------------------------------------------
# presets


@dataclass(frozen=True)
class ChatPreset:
    """A fixed prompt format.

    A turn-based format is given by its pieces: ``system`` (with ``{content}``),
    ``user`` (with ``{content}``), the assistant ``prefix`` (also the
    generation prompt) and ``suffix`` around an answer, and a ``begin`` string
    put once at the very start.  ``render`` overrides them for formats that do
    not fit (firefly, llama2, raw).
    """

    name: str
    description: str
    stop: tuple[str, ...] = ()
    begin: str = ""
    system: str = "{content}\n"
    user: str = "{content}\n"
    prefix: str = ""
    suffix: str = "\n"
    default_system: str | None = None
    includes_bos: bool = False  # the rendered text starts with the BOS string <s>
    render: Callable[[list[dict], bool], str] | None = field(default=None, repr=False)

    def apply(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self.render is not None:
            return self.render(messages, add_generation_prompt)
        out = [self.begin]
        system, body = _split_system(messages)
        if system is None:
            system = self.default_system
        if system is not None:
            out.append(self.system.format(content=system))
        for m in body:
            if m["role"] == "user":
                out.append(self.user.format(content=m["content"]))
            else:
                out.append(self.prefix + m["content"] + self.suffix)
        if add_generation_prompt:
            out.append(self.prefix)
        return "".join(out)


def _split_system(messages: list[dict]) -> tuple[str | None, list[dict]]:
    if messages[0]["role"] == "system":
        body = messages[1:]
        system = messages[0]["content"]
    else:
        body, system = messages, None
    for j, m in enumerate(body):
        if m["role"] == "system":
            raise ValueError(f"messages[{j + (system is not None)}]: a system message must come first")
    return system, body


def _render_firefly(messages: list[dict], add_generation_prompt: bool) -> str:
    # v1 (BLOOM, 2023-04): trained on <s>input</s></s>target</s>, so a single
    # question is prompted as <s>{input}</s></s>.  With history, the later
    # multi-turn form <s>input1</s>target1</s>input2</s> is used.
    system, body = _split_system(messages)
    out = "<s>" + (system + "\n" if system is not None else "")
    out += "".join(m["content"] + "</s>" for m in body)
    if add_generation_prompt and len(body) == 1 and body[0]["role"] == "user":
        out += "</s>"
    return out


def _render_llama2(messages: list[dict], add_generation_prompt: bool) -> str:
    # Meta's chat format: each [INST] turn opens with BOS, each answer ends with EOS.
    system, body = _split_system(messages)
    out = []
    pending_user: str | None = None
    for m in body:
        content = m["content"].strip()
        if m["role"] == "user":
            if pending_user is not None:  # two user turns in a row: close the first
                out.append(f"<s>[INST] {pending_user} [/INST]")
            if system is not None and not out and pending_user is None:
                content = f"<<SYS>>\n{system.strip()}\n<</SYS>>\n\n{content}"
            pending_user = content
        else:
            if pending_user is None:
                out.append(f" {content} </s>")
            else:
                out.append(f"<s>[INST] {pending_user} [/INST] {content} </s>")
            pending_user = None
    if pending_user is not None:
        out.append(f"<s>[INST] {pending_user} [/INST]")
    elif system is not None and not body:
        out.append(f"<s>[INST] <<SYS>>\n{system.strip()}\n<</SYS>>\n\n [/INST]")
    return "".join(out)


def _render_raw(messages: list[dict], add_generation_prompt: bool) -> str:
    return "".join(m["content"] for m in messages if m["role"] in ("system", "user"))


PRESETS: dict[str, ChatPreset] = {
    p.name: p
    for p in [
        ChatPreset(
            name="chatml",
            description="ChatML (<|im_start|>role ... <|im_end|>): SmolLM2, Qwen, many fine-tunes",
            stop=("<|im_end|>",),
            system="<|im_start|>system\n{content}<|im_end|>\n",
            user="<|im_start|>user\n{content}<|im_end|>\n",
            prefix="<|im_start|>assistant\n",
            suffix="<|im_end|>\n",
        ),
        ChatPreset(
            name="linly",
            description="Linly-ChatFlow: User:{q}\\n{a}\\n (ProjectD-AI/llama_inference)",
            stop=("\nUser:",),
            user="User:{content}\n",
            prefix="",
            suffix="\n",
        ),
        ChatPreset(
            name="chinese-alpaca",
            description="Chinese-Alpaca: the Alpaca instruction template (ymcui/Chinese-LLaMA-Alpaca)",
            stop=("### Instruction:",),
            system="{content}\n\n",
            default_system=ALPACA_HEADER,
            user="### Instruction:\n\n{content}\n\n",
            prefix="### Response:\n\n",
            suffix="\n\n",
        ),
        ChatPreset(
            name="belle",
            description="BELLE (newer form): Human: \\n{q}\\n\\nAssistant: \\n (LianjiaTech/BELLE)",
            stop=("\nHuman:",),
            system="{content}\n\n",
            user="Human: \n{content}\n\n",
            prefix="Assistant: \n",
            suffix="\n\n",
        ),
        ChatPreset(
            name="billa",
            description="BiLLa: Human: {q}\\nAssistant: (one space after the colon)",
            stop=("\nHuman:",),
            user="Human: {content}\n",
            prefix="Assistant: ",
            suffix="\n",
        ),
        ChatPreset(
            name="ziya",
            description="Ziya-LLaMA: <human>:{q}\\n<bot>: with turns joined by \\n",
            stop=("<human>:",),
            user="<human>:{content}\n",
            prefix="<bot>:",
            suffix="\n",
        ),
        ChatPreset(
            name="firefly",
            description="Firefly: <s>{input}</s></s> (v1, BLOOM); multi-turn <s>q1</s>a1</s>q2</s>",
            stop=("</s>",),
            includes_bos=True,
            render=_render_firefly,
        ),
        ChatPreset(
            name="llama2",
            description="LLaMA-2 chat: <s>[INST] <<SYS>>\\n...\\n<</SYS>>\\n\\n{q} [/INST] {a} </s>",
            stop=(),
            includes_bos=True,
            render=_render_llama2,
        ),
        ChatPreset(
            name="raw",
            description="no template: the system and user contents, concatenated",
            stop=(),
            render=_render_raw,
        ),
    ]
}


def list_presets() -> list[str]:
    """Names of the built-in prompt formats."""
    return list(PRESETS)


def _preset(name: str) -> ChatPreset:
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown chat preset {name!r}; known presets: {', '.join(PRESETS)}") from None


def preset_stop_strings(name: str) -> list[str]:
    """Stop strings that end an answer in preset ``name``."""
    return list(_preset(name).stop)


# --------------------------------------------------------------------------
# Jinja templates (Hugging Face chat_template semantics)


class TemplateError(ValueError):
    """A chat template failed to compile or raised while rendering."""


def _raise_exception(message: str) -> None:
    raise TemplateError(f"chat template error: {message}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"chat template does not compile: {e.message} (line {e.lineno})") from None


def render_chat(
    messages: list[dict],
    template: str | None = None,
    preset: str | None = None,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
) -> str:
    """Render ``messages`` into a prompt string.

    Give exactly one of ``template`` (a Jinja chat template, as in
    tokenizer_config.json) or ``preset`` (a name from :func:`list_presets`).
    ``bos_token`` / ``eos_token`` are visible to templates only.
    Raises ValueError on bad messages, an unknown preset or a template error.
    """
    messages = validate_messages(messages)
    if template is not None and preset is not None:
        raise ValueError("give either template= or preset=, not both")
    if preset is not None:
        return _preset(preset).apply(messages, add_generation_prompt)
    if template is None:
        raise ValueError(
            f"no chat template: pass template= (the checkpoint's chat_template) "
            f"or preset= (one of {', '.join(PRESETS)})"
        )
    if not isinstance(template, str):
        raise ValueError(f"template must be a str, got {type(template).__name__}")
    import jinja2

    compiled = _compile(template)
    try:
        return compiled.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
        )
    except TemplateError:
        raise
    except jinja2.TemplateError as e:
        raise TemplateError(f"chat template failed: {e}") from None
