"""Chat messages -> (prompt text, response text), rendered with the tokenizer's chat template.

The prompt is the messages the two conversations share, rendered with the generation prompt; a
response is the rest of its conversation as the template renders it (so it carries the template's
end-of-turn marker, which is where a causal reward model reads the reward). A tokenizer without a chat
template (ByT5, BERT) uses ``data.format_options.fallback_template`` instead.
"""

from __future__ import annotations

from typing import Any

from rmlab.data.sources import DataError

# HH-RLHF's own plain-text convention: readable by any tokenizer, and the same text the HH files hold.
DEFAULT_FALLBACK_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}\n\nHuman: {{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}\n\nAssistant: {{ m['content'] }}"
    "{% else %}{{ m['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}\n\nAssistant:{% endif %}"
)


def check_messages(value: Any, where: str, field: str) -> list[dict[str, str]]:
    """A list of {role, content} dicts with string values, or a DataError naming the field."""
    if isinstance(value, str):
        raise DataError(
            where,
            f"field {field!r} is a string, the chat format needs a list of {{role, content}} messages",
            "use data.format=pairs for plain text, or data.format=implicit_prompt for HH-style text",
        )
    if not isinstance(value, list) or not value:
        raise DataError(
            where,
            f"field {field!r} must be a non-empty list of messages, got {type(value).__name__}",
            "map data.fields to the messages field, or set data.on_error=skip",
        )
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            got = sorted(m) if isinstance(m, dict) else type(m).__name__
            raise DataError(
                where,
                f"field {field!r}, message {i}: needs string 'role' and 'content', got {got}",
                "convert the messages to {role, content}, or set data.on_error=skip",
            )
        out.append({"role": m["role"], "content": m["content"]})
    return out


def render(messages: list[dict[str, str]], tokenizer: Any, template: str, generation_prompt: bool) -> str:
    """Render with the tokenizer's template, or ``template`` when it has none (or there is no tokenizer)."""
    if tokenizer is not None:
        own = getattr(tokenizer, "chat_template", None)
        return tokenizer.apply_chat_template(
            messages, chat_template=own or template, tokenize=False, add_generation_prompt=generation_prompt
        )
    import jinja2

    return jinja2.Template(template).render(messages=messages, add_generation_prompt=generation_prompt)


def split_chat(
    chosen: list[dict[str, str]], rejected: list[dict[str, str]], tokenizer: Any, template: str
) -> tuple[str, str, str]:
    """(prompt, chosen response, rejected response) as rendered text.

    The shared messages are the prompt. Where the template renders the full conversation as the
    prompt followed by more text (all common templates), the response is that extra text; otherwise
    it falls back to the last message's content.
    """
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    prompt = render(chosen[:n], tokenizer, template, generation_prompt=True) if n else ""
    out = []
    for conv in (chosen, rejected):
        full = render(conv, tokenizer, template, generation_prompt=False)
        if prompt and full.startswith(prompt):
            out.append(full[len(prompt) :])
        else:
            out.append("\n".join(m["content"] for m in conv[n:]))
    return prompt, out[0], out[1]
