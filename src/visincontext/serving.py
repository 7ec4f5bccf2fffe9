# Copyright 2026 The visincontext authors. Licensed under the Apache License, Version 2.0.
"""`visincontext serve`: transformers' own OpenAI-compatible server (`transformers serve`) for a VisInContext folder.

The app, its request schema, streaming and the model's process are transformers' (`transformers.cli.serving`); this
module changes three things it cannot do for a remote-code model today:

- the model loads through `AutoModelForImageTextToText` (upstream looks its class up as `transformers.<architecture>`);
- its modality is a vision-language model (upstream knows only the in-library Auto mappings: "Unknown modality");
- messages become the processor's chat format here, with the package's `{"type": "context", "text": ...}` item, and
  anything the model cannot take (an unknown content type, an unreadable image, tools, context over the page limit)
  is a 400 that names it, where upstream drops unknown content types.

Needs `pip install "visincontext[serve]"` (transformers' `serving` extra and the `openai` types it uses).
"""

from __future__ import annotations

import argparse
import json
import sys

import transformers
from packaging import version

SERVE_EXTRA = 'pip install "visincontext[serve]"'
# What a message item may be: chat completions' names, then the Responses API's, then the package's own
TEXT_TYPES = ("text", "input_text", "output_text")
IMAGE_TYPES = ("image_url", "input_image")
CONTEXT_TYPE = "context"
OVERFLOW_CHOICES = ("error", "keep_end", "truncate")


LOWEST_TRANSFORMERS = "5.25"  # the server's model process (`EngineClient`) and the loader this module builds on
if version.parse(transformers.__version__) < version.parse(LOWEST_TRANSFORMERS):
    raise ImportError(
        f"visincontext serve needs transformers>={LOWEST_TRANSFORMERS}, found {transformers.__version__}: "
        + SERVE_EXTRA
    )
try:
    from transformers.cli.serving import chat_completion, completion, model_manager, response, server, utils
    from transformers.cli.serving.systemone import SystemOneHandler
    from transformers.cli.serving.transcription import TranscriptionHandler
except ImportError as error:  # an older transformers: no `transformers.cli.serving`
    raise ImportError(f"visincontext serve needs transformers' server ({SERVE_EXTRA}): {error}") from None


def check_serve_available() -> None:
    """Raises ImportError saying what to install where FastAPI, uvicorn or openai are missing."""
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        raise ImportError(f"visincontext serve needs FastAPI, uvicorn and openai: {SERVE_EXTRA}")


def image_from_url(url, where: str):
    """An image item's `url` as a PIL image: a `data:image/...;base64,` URL or an http(s) address. A path on the
    server's disk is refused: a request must not read the server's files."""
    import base64
    import binascii
    import io

    from PIL import Image, ImageOps, UnidentifiedImageError
    from transformers.image_utils import load_image

    if not isinstance(url, str):
        raise ValueError(f"{where}: expected a URL string, got {type(url).__name__}")
    if url.startswith(("http://", "https://")):
        try:
            return load_image(url, timeout=30)
        except Exception as error:  # a failed download, or what came back is no image
            raise ValueError(f"{where}: unreadable image at {url[:80]!r} ({type(error).__name__})") from None
    header, comma, data = url.partition(",")
    if not (url.startswith("data:image/") and header.endswith(";base64") and comma):
        raise ValueError(f"{where}: expected a data:image/...;base64, URL or an http(s) URL, got {url[:40]!r}")
    try:
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        image.load()
    except binascii.Error:
        raise ValueError(f"{where}: the data URL is not valid base64") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:  # PIL's decoders raise these for bad bytes
        raise ValueError(
            f"{where}: unreadable image ({error.__class__.__name__}: not a PNG, JPEG, ... PIL reads)"
        ) from None
    return ImageOps.exif_transpose(image).convert("RGB")  # as `transformers.image_utils.load_image` does


def messages_to_conversation(messages) -> list[dict]:
    """OpenAI chat messages -> the processor's conversation (`VisInContextProcessor.apply_chat_template`): text, image
    and context items. Raises ValueError naming the message and item for anything it cannot carry."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: expected a non-empty list of messages")
    conversation = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"messages[{i}]: expected an object with a 'role' string and 'content'")
        if message.get("tool_calls"):
            raise ValueError(f"messages[{i}].tool_calls: this model has no tool calls")
        content = message.get("content")
        if content is None or isinstance(content, str):
            conversation.append({"role": message["role"], "content": content or ""})
            continue
        if not isinstance(content, list):
            raise ValueError(f"messages[{i}].content: expected a string or a list of items")
        items = []
        for j, item in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            kind = item.get("type") if isinstance(item, dict) else None
            if kind in TEXT_TYPES or kind == CONTEXT_TYPE:
                if not isinstance(item.get("text"), str):
                    raise ValueError(f"{where}.text: a {kind} item needs a 'text' string")
                items.append({"type": "context" if kind == CONTEXT_TYPE else "text", "text": item["text"]})
            elif kind in IMAGE_TYPES:
                url = item.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url  # chat completions nest it, Responses do not
                items.append({"type": "image", "image": image_from_url(url, f"{where}.image_url")})
            else:
                accepted = (*TEXT_TYPES, *IMAGE_TYPES, CONTEXT_TYPE)
                raise ValueError(f"{where}.type: unknown content type {kind!r}; this model takes {accepted}")
        conversation.append({"role": message["role"], "content": items})
    return conversation


class VisInContextModelLoader(model_manager.ModelLoader):
    """Loads the folder with `AutoModelForImageTextToText`; its processor renders context with `context_overflow`
    (`"error"`: a context over `max_pages` is the request's error, not cut silently)."""

    def __init__(self, context_overflow: str = "error", **kwargs):
        super().__init__(**kwargs)
        self.context_overflow = context_overflow

    def load_processor(self, model_id: str):
        processor = super().load_processor(model_id)
        if not hasattr(processor, "renderer"):
            raise ValueError(f"model: {model_id!r} has no VisInContext processor (got {type(processor).__name__})")
        processor.overflow = self.context_overflow
        return processor

    def _load_model(self, model_id: str, tqdm_class=None, progress_callback=None):
        from transformers import AutoModelForImageTextToText

        repo, revision, gguf_file = utils.parse_model_id(model_id)
        if gguf_file is not None:
            raise ValueError(f"model: {model_id!r} is a GGUF file; VisInContext serves a save_pretrained folder")
        kwargs = {
            "revision": revision,
            "attn_implementation": self.attn_implementation,
            "dtype": self.dtype,
            "device_map": self.device,
            "trust_remote_code": self.trust_remote_code,
            "tqdm_class": tqdm_class,
        }
        quantization_config = self.get_quantization_config()
        if quantization_config is not None:
            kwargs["quantization_config"] = quantization_config
        if progress_callback is not None:
            progress_callback({"status": "loading", "model": model_id, "stage": "config"})
        return AutoModelForImageTextToText.from_pretrained(repo, **kwargs).eval()


class VisInContextEngineClient(model_manager.EngineClient):
    modality = utils.Modality.VLM  # upstream finds it only in the in-library Auto mappings


class VisInContextModelManager(model_manager.ModelManager):
    def preload_engine(self, force_model: str, engine_connection) -> None:
        model_id = utils.canonical_model_id(force_model)
        engine = VisInContextEngineClient(model_id, self.loader, self.generation_state, connection=engine_connection)
        self.engines[model_id] = engine
        if engine_connection is None:
            engine.start()


class ContextMessages:
    """The handlers' `render_messages`, through `messages_to_conversation` and the processor's chat template."""

    def render_messages(self, engine, messages, body: dict) -> dict:
        if body.get("tools"):
            raise ValueError("tools: this model's chat template has no tool calls")
        template_kwargs = self._chat_template_kwargs(body)
        if "context" in template_kwargs:  # a template variable nothing reads: the context would be lost
            raise ValueError(
                "chat_template_kwargs.context: give context as a message item {'type': 'context', 'text': ...}"
            )
        return engine.processor.apply_chat_template(
            messages_to_conversation(messages),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            **template_kwargs,
        )


class ChatCompletionHandler(ContextMessages, chat_completion.ChatCompletionHandler):
    pass


class ResponseHandler(ContextMessages, response.ResponseHandler):
    pass


def build_app(model: str, *, context_overflow: str = "error", chat_template_kwargs: dict | None = None, **options):
    """transformers' FastAPI app serving the VisInContext folder or Hub id `model`, its model loaded now (in a process
    of its own). `options`: `device`, `dtype`, `quantization`, `attn_implementation`, `trust_remote_code` (as
    `transformers serve`), `seed`, `max_model_len`. Returns `(app, model_manager)`."""
    generation_state = utils.GenerationState(
        seed=options.pop("seed", None), max_model_len=options.pop("max_model_len", None)
    )
    loader = VisInContextModelLoader(context_overflow=context_overflow, **options)
    manager = VisInContextModelManager(loader, generation_state, model_timeout=-1, force_model=model)
    shared = dict(model_manager=manager, generation_state=generation_state, chat_template_kwargs=chat_template_kwargs)
    app = server.build_server(
        manager,
        ChatCompletionHandler(**shared),
        completion_handler=completion.CompletionHandler(model_manager=manager, generation_state=generation_state),
        response_handler=ResponseHandler(**shared),
        transcription_handler=TranscriptionHandler(manager),
        systemone_handler=SystemOneHandler(**shared, decision_config=None),
    )
    return app, manager


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="visincontext serve",
        description="Serve a VisInContext model with transformers' OpenAI-compatible server (/v1/chat/completions).",
    )
    parser.add_argument("model", help="a folder written by save_pretrained / prepare_repo, or a Hub id")
    parser.add_argument("--host", default="localhost", help="listen address (default: localhost)")
    parser.add_argument("--port", type=int, default=8000, help="listen port (default: 8000)")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda:0', ... (default: auto)")
    parser.add_argument("--dtype", default="auto", help="'auto' (the weights') or a torch dtype such as bfloat16")
    parser.add_argument("--quantization", choices=("bnb-4bit", "bnb-8bit"), default=None)
    parser.add_argument("--attn-implementation", default=None, help="e.g. sdpa, eager, flash_attention_2")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the folder's own modeling files (default: the installed visincontext package's classes)",
    )
    parser.add_argument(
        "--context-overflow",
        choices=OVERFLOW_CHOICES,
        default="error",
        help="context over the processor's max_pages: a 400 (error, default), or keep its end / start",
    )
    parser.add_argument("--chat-template-kwargs", default=None, help="JSON object: default apply_chat_template kwargs")
    parser.add_argument("--max-model-len", type=int, default=None, help="longest prompt + answer, in tokens")
    parser.add_argument("--default-seed", type=int, default=None)
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    args = parser.parse_args(argv)
    if args.port is not None and not 0 <= args.port <= 65535:
        parser.error(f"--port: expected 0-65535, got {args.port}")
    if args.chat_template_kwargs is not None:
        try:
            args.chat_template_kwargs = json.loads(args.chat_template_kwargs)
        except json.JSONDecodeError as error:
            parser.error(f"--chat-template-kwargs: not JSON ({error})")
        if not isinstance(args.chat_template_kwargs, dict):
            parser.error("--chat-template-kwargs: expected a JSON object")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_serve_available()
        import uvicorn
    except ImportError as error:
        print(f"visincontext serve: error: {error}", file=sys.stderr)
        return 2
    from transformers.utils import logging

    utils.set_serve_log_level(logging.log_levels[args.log_level])
    try:
        app, manager = build_app(
            args.model,
            context_overflow=args.context_overflow,
            chat_template_kwargs=args.chat_template_kwargs,
            device=args.device,
            dtype=args.dtype,
            quantization=args.quantization,
            attn_implementation=args.attn_implementation,
            trust_remote_code=args.trust_remote_code,
            seed=args.default_seed,
            max_model_len=args.max_model_len,
        )
    except (ValueError, OSError, RuntimeError) as error:  # a bad folder, option or a model that failed to load
        print(f"visincontext serve: error: {error}", file=sys.stderr)
        return 2

    async def stop_if_the_engine_died() -> None:
        if manager.is_dead:
            http_server.should_exit = True

    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        callback_notify=stop_if_the_engine_died,
        timeout_notify=5,
    )
    http_server = uvicorn.Server(config)
    http_server.run()
    return 1 if manager.is_dead else 0


if __name__ == "__main__":
    sys.exit(main())
