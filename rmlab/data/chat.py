"""Chat messages -> (prompt text, response text), rendered with the tokenizer's chat template.

The prompt is the messages the conversations share, rendered with the generation prompt; a response is
the rest of its conversation as the template renders it, so prompt + response is the conversation's whole
rendering (what ``apply_chat_template(messages, tokenize=True)`` tokenizes; docs/eval.md, the scoring
contract). A tokenizer without a chat template (ByT5, BERT) uses ``data.format_options.fallback_template``
instead, and the export saves that template with the tokenizer.
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


def render(
    messages: list[dict[str, str]], tokenizer: Any, template: str, generation_prompt: bool, where: str = "(messages)"
) -> str:
    """Render with the tokenizer's template, or ``template`` when it has none (or there is no tokenizer).

    A template may refuse messages it does not take (Mistral's and Gemma's raise "Conversation roles must
    alternate ..." or "System role not supported"): that refusal is a ``DataError`` at ``where``, so it names
    the record and ``data.on_error=skip`` counts it, as for any other malformed record."""
    import jinja2

    try:
        if tokenizer is not None:
            own = getattr(tokenizer, "chat_template", None)
            return tokenizer.apply_chat_template(
                messages, chat_template=own or template, tokenize=False, add_generation_prompt=generation_prompt
            )
        return jinja2.Template(template).render(messages=messages, add_generation_prompt=generation_prompt)
    except jinja2.TemplateError as e:
        roles = ", ".join(str(m.get("role")) for m in messages)
        raise DataError(
            where,
            f"the chat template refused the messages (roles: {roles}): {str(e)[:200]}",
            "fix the messages to the roles and order this tokenizer's template takes, or set data.on_error=skip",
        ) from None


def shared_turns(conversations: list[list[dict[str, str]]]) -> int:
    """How many leading messages all the conversations share (the prompt), keeping at least one message of
    each conversation to be the response. One conversation: all but its last message."""
    shortest = min(len(c) for c in conversations)
    n = 0
    while n < shortest - 1 and all(c[n] == conversations[0][n] for c in conversations):
        n += 1
    return n


def split_conversations(
    conversations: list[list[dict[str, str]]], tokenizer: Any, template: str, where: str = "(messages)"
) -> tuple[str, list[str]]:
    """(prompt, [response, ...]) as rendered text, such that ``prompt + response`` is each conversation's
    whole rendering, exactly (the scoring contract: the row scored is the template's text, nothing added).

    The prompt is the shared messages rendered with the generation prompt. Where a template renders a
    conversation as something other than that prompt followed by more text (a template that rewrites earlier
    turns, e.g. drops reasoning), the prompt is empty and each response is its whole rendering: exact, only
    without prompt sharing. ``where`` (the record's location) names a template's refusal (``render``).
    """
    n = shared_turns(conversations)
    full = [render(c, tokenizer, template, generation_prompt=False, where=where) for c in conversations]
    prompt = render(conversations[0][:n], tokenizer, template, generation_prompt=True, where=where) if n else ""
    if not all(f.startswith(prompt) for f in full):
        prompt = ""
    return prompt, [f[len(prompt) :] for f in full]


def with_prompt(prompt: Any, conversation: list[dict[str, str]], where: str, field: str) -> list[dict[str, str]]:
    """A conversation whose prompt lives in its own field (a string or messages): the prompt's messages come
    first, unless the conversation already holds a user turn (then it carries its prompt itself)."""
    if prompt is None or any(m["role"] == "user" for m in conversation):
        return conversation
    head = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else check_messages(prompt, where, field)
    return head + conversation
