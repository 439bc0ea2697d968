"""Chat messages -> prompt token ids, through the tokenizer's chat template.

The one place LLM.chat, the CLI and the server turn a conversation into tokens, so each of them
rejects a malformed message with the same clear ValueError instead of a Jinja or KeyError deep
inside transformers."""

from __future__ import annotations

from typing import Any

ROLES = ("system", "user", "assistant", "tool", "developer")
_NEEDS = f"each message needs 'role' ({', '.join(ROLES)}) and 'content'"


def _text_of_parts(i: int, parts: list) -> str:
    """OpenAI-style content parts -> one string. Text parts are joined with newlines, as vLLM
    does for templates that take string content."""
    texts = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            got = f"type {kind!r}" if isinstance(part, dict) else f"a {type(part).__name__}"
            raise ValueError(f"message {i} content part {j} is {got}; only text parts "
                             "({'type': 'text', 'text': ...}) are supported")
        if not isinstance(part.get("text"), str):
            raise ValueError(f"message {i} content part {j} needs 'text' to be a string, "
                             f"got {part.get('text')!r}")
        texts.append(part["text"])
    return "\n".join(texts)


def validate_messages(messages: Any) -> list[dict]:
    """Check one conversation and return it ready for a chat template: shallow copies of the
    messages, with list-of-parts content joined into one string."""
    if isinstance(messages, dict):
        raise ValueError("messages must be a list of message dicts (one conversation), got a single dict; "
                         "wrap it in a list: [message]")
    if not isinstance(messages, (list, tuple)):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts (one conversation), "
                         f"got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty; a conversation needs at least one message, "
                         "e.g. [{'role': 'user', 'content': 'Hello'}]")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            hint = " (several conversations? pass them one at a time)" if isinstance(message, (list, tuple)) else ""
            raise ValueError(f"message {i} is a {type(message).__name__}, not a dict{hint}; {_NEEDS}")
        if "role" not in message:
            raise ValueError(f"message {i} has no 'role'; {_NEEDS}")
        role = message["role"]
        if role not in ROLES:
            raise ValueError(f"message {i} has role {role!r}; the role must be one of {', '.join(ROLES)}")
        message = dict(message)
        content = message.get("content")
        if isinstance(content, list):
            message["content"] = _text_of_parts(i, content)
        elif content is None:
            # OpenAI lets an assistant turn that only calls tools leave content out or None.
            if not (role == "assistant" and message.get("tool_calls")):
                what = "has no 'content'" if "content" not in message else "has content None"
                raise ValueError(f"message {i} ({role}) {what}; {_NEEDS} (only an assistant message "
                                 "with 'tool_calls' may leave content empty)")
        elif not isinstance(content, str):
            raise ValueError(f"message {i} content must be a string or a list of text parts, "
                             f"got {type(content).__name__}")
        out.append(message)
    return out


def apply_chat_template(tokenizer, messages: Any, *, add_generation_prompt: bool = True,
                        chat_template: str | None = None, **template_kwargs: Any) -> list[int]:
    """Token ids of one conversation rendered by `chat_template` (default: the tokenizer's own).
    `template_kwargs` reach the template (e.g. enable_thinking=False for Qwen3)."""
    if tokenizer is None:
        raise ValueError("chat needs a tokenizer, and this model was loaded without one; "
                         "pass tokenizer=PATH, or send token ids instead of chat messages")
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; pass chat_template=... (a Jinja "
                         "string), or send a plain text prompt instead of chat messages")
    conversation = validate_messages(messages)
    from jinja2 import TemplateError  # transformers renders chat templates with jinja2

    try:
        ids = tokenizer.apply_chat_template(conversation, tokenize=True, add_generation_prompt=add_generation_prompt,
                                            chat_template=chat_template, **template_kwargs)
    except TemplateError as e:  # e.g. a template that raises on roles out of order
        raise ValueError(f"the chat template rejected the messages: {e}") from e
    if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return [int(t) for t in ids]
