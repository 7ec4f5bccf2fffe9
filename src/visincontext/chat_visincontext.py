# Copyright 2026 The visincontext authors. Licensed under the Apache License, Version 2.0.
"""The processor's chat format: its template (around the language model's own) and its conversations' checks.

Remote code: imports only the standard library, so a saved folder's processor loads it beside itself.
"""

import re

# Chat templates. Content items: {"type": "image"} (with "image", "url" or "path" when tokenizing), {"type": "text",
# "text": ...} and {"type": "context", "text": ...}. The preamble turns each message's items into one string: an image
# is `<image>` where it stands, text is itself, context is left out of the prompt (the processor renders it into
# pages, read by every token of the sample), and an assistant turn ends its chunk with `<|endofchunk|>`. The body
# then lays the messages out: the wrapped LM's own template where it has one (its role markers and generation
# prompt), else `DEFAULT_CHAT_BODY`.
CHAT_PREAMBLE = (
    "{%- set ns = namespace(messages=[]) -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- else -%}{%- set parts = namespace(text='') -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{%- set parts.text = parts.text + '<image>' -%}"
    "{%- elif item['type'] == 'text' -%}{%- set parts.text = parts.text + item['text'] -%}"
    "{%- endif -%}{%- endfor -%}{%- set text = parts.text -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set text = text + '<|endofchunk|>' -%}{%- endif -%}"
    "{%- set ns.messages = ns.messages + [{'role': message['role'], 'content': text}] -%}"
    "{%- endfor -%}{%- set messages = ns.messages -%}\n"
)
DEFAULT_CHAT_BODY = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] }}{{ '\\n' }}"
    "{%- else -%}{{ message['role'] | capitalize }}: {{ message['content'] }}{{ '\\n' }}{%- endif -%}"
    "{%- endfor -%}{%- if add_generation_prompt -%}Assistant: {% endif -%}"
)
# A body is wrapped in a macro and laid out turn by turn, so that each assistant answer (its text and
# `<|endofchunk|>`, what the package's collator trains on) stands inside `{% generation %}`: transformers'
# `return_assistant_tokens_mask` and TRL's `assistant_only_loss` then train on exactly the answers, with any LM's
# own template. An answer's place is where the body, given the turns before it and a generation prompt, stops; a
# body that does not lay out a conversation's start the same way on its own is rendered whole, unmarked (the
# processor's `apply_chat_template` then refuses `return_assistant_tokens_mask`, see there).
_BODY_MACRO_START = "{%- macro language_model_body(messages, add_generation_prompt) -%}\n"
_BODY_MACRO_END = "\n{%- endmacro -%}\n"
MARKED_LAYOUT = (
    "{%- set layout = namespace(pieces=[], done='', stable=true) -%}"
    "{%- for message in messages -%}"
    "{%- set upto = language_model_body(messages[:loop.index], false) -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- set header = language_model_body(messages[:loop.index0], true) -%}"
    "{%- set answer = message['content'] -%}"
    "{%- else -%}{%- set header = layout.done -%}{%- set answer = '' -%}{%- endif -%}"
    "{%- if header.startswith(layout.done) and upto.startswith(header + answer) -%}"
    "{%- set layout.pieces = layout.pieces + [[header[layout.done | length:], false], [answer, true],"
    " [upto[(header + answer) | length:], false]] -%}"
    "{%- else -%}{%- set layout.stable = false -%}{%- endif -%}"
    "{%- set layout.done = upto -%}"
    "{%- endfor -%}"
    "{%- set whole = language_model_body(messages, add_generation_prompt) -%}"
    "{%- if layout.stable and whole.startswith(layout.done) -%}"
    "{%- for piece in layout.pieces if piece[0] -%}"
    "{%- if piece[1] -%}{% generation %}{{ piece[0] }}{% endgeneration %}{%- else -%}{{ piece[0] }}{%- endif -%}"
    "{%- endfor -%}{{ whole[layout.done | length:] }}"
    "{%- else -%}{{ whole }}{%- endif -%}"
)
GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
CONTENT_TYPES = ("image", "text", "context", "image_url")  # image_url: OpenAI-style, for templates that take it


def chat_template_for(language_model_template: str | dict | None) -> str:
    """The processor's chat template: the preamble, then the LM's own template (its "default" one when it has several),
    or the default body (`User: ...`, `Assistant: ...`, generation prompt `Assistant: `), laid out so that each
    assistant answer stands inside `{% generation %}` markers. A template that has its own markers is kept as it is.
    """
    if isinstance(language_model_template, dict):
        language_model_template = language_model_template.get("default")
    body = language_model_template or DEFAULT_CHAT_BODY
    if GENERATION_MARKER.search(body):
        return CHAT_PREAMBLE + body
    return CHAT_PREAMBLE + _BODY_MACRO_START + body + _BODY_MACRO_END + MARKED_LAYOUT


def field(thing, name: str):
    """A message's or item's field: dicts and objects with the same attributes (TRL's, pydantic's) alike."""
    return thing.get(name) if isinstance(thing, dict) else getattr(thing, name, None)


def conversation_context(conversation, tokenize: bool = False) -> str | None:
    """Checks a conversation's messages and items (dicts or objects with the same fields, as TRL and pydantic give
    them), naming the message and item, and returns its context: the text of its `context` items joined by a blank
    line, or None. With `tokenize=True` an image item must carry its image (`image`, `url`, `path` or `base64`)."""
    messages = getattr(conversation, "messages", conversation)
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("conversation: expected a non-empty list of messages")
    contexts = []
    for i, message in enumerate(messages):
        if not isinstance(field(message, "role"), str):
            raise ValueError(f"messages[{i}]: expected a message with a 'role' string and 'content'")
        content = field(message, "content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, (list, tuple)):
            kind = type(content).__name__
            raise ValueError(f"messages[{i}].content: expected a string or a list of items, got {kind}")
        for j, item in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            kind = field(item, "type")
            if kind not in CONTENT_TYPES:
                raise ValueError(f"{where}: unknown content type {kind!r}; expected one of {CONTENT_TYPES}")
            if kind in ("text", "context") and not isinstance(field(item, "text"), str):
                got = type(field(item, "text")).__name__
                raise ValueError(f"{where}: a {kind} item needs a string 'text', got {got}")
            has_image = any(field(item, key) is not None for key in ("image", "url", "path", "base64"))
            if kind == "image" and tokenize and not has_image:
                raise ValueError(f"{where}: an image item without an image (give it 'image', 'url' or 'path')")
            if kind == "context":
                contexts.append(field(item, "text"))
    return "\n\n".join(contexts) if contexts else None


def check_assistant_masks(conversations: list, assistant_masks) -> None:
    """A conversation with assistant turns must have some assistant tokens marked (`return_assistant_tokens_mask`)."""
    for i, messages in enumerate(conversations):
        answers = any(field(m, "role") == "assistant" for m in getattr(messages, "messages", messages))
        if answers and not any(assistant_masks[i]):
            raise ValueError(
                f"return_assistant_tokens_mask: conversation {i} has assistant turns but the chat template "
                "marks none: its body does not lay out the turns before an answer the same way on their own "
                "(see `chat_template_for`); give a template with `{% generation %}` markers"
            )
