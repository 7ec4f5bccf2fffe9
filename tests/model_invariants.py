"""The invariants every VisInContext model keeps, however it was built (issue 35), measured in one place.

`measure(model, reload)` returns numbers, `check(result)` asserts them:
- the attention implementation of every config and backbone is set (`None` runs transformers' attention unmasked);
- causal: the logits at position i do not change when only tokens after i change (with media and open gates);
- cached greedy generation gives the tokens and scores of uncached generation;
- with every gate at 0 and no media, the logits equal the bare language model's;
- saved and reloaded, the model gives the same logits and generates the same tokens;
- and nothing of this made transformers (or the model) warn.

Imports torch and transformers only, so that a script where `visincontext` cannot be imported (a remote-code folder
loaded with `trust_remote_code=True`) measures the same things: tests/test_construction.py runs it so.
"""

import json
import logging
import tempfile
import warnings
from contextlib import contextmanager

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

# the loggers of transformers, of remote code loaded by it (`transformers_modules.<hash>.modeling_visincontext`, not
# under `transformers`) and of this package
LOGGERS = ("transformers", "transformers_modules", "visincontext")


_ACTIVE: list[list[str]] = []  # the record lists of the `library_warnings` blocks open now, innermost last


class _Collect(logging.Handler):
    def __init__(self, records: list):
        super().__init__(level=logging.WARNING)
        self.records = records

    def emit(self, record):
        if _ACTIVE and _ACTIVE[-1] is self.records:  # a block inside another takes what is said inside it
            self.records.append(f"{record.name}: {record.getMessage()}")


@contextmanager
def library_warnings():
    """Collects, as strings, what transformers' (and the model's) loggers say at WARNING or above and every Python
    warning raised inside. transformers says many things once per process (`warning_once`): its memory is cleared
    first, so that a warning already given earlier in the same process is given again here. Blocks nest: what is
    said inside an inner block is the inner block's only (a test explains the warnings it means to cause)."""
    import transformers.utils.logging as hf_logging

    once = getattr(logging.Logger.warning_once, "cache_clear", None)
    if once is not None:
        once()
    records: list[str] = []
    handler = _Collect(records)
    loggers = [logging.getLogger(name) for name in LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(min(logger.getEffectiveLevel(), logging.WARNING))
    hf_logging.disable_progress_bar()
    _ACTIVE.append(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield records
        records.extend(f"{w.category.__name__}: {w.message}" for w in caught)
    finally:
        _ACTIVE.pop()
        hf_logging.enable_progress_bar()
        for logger, level in zip(loggers, levels):
            logger.removeHandler(handler)
            logger.setLevel(level)


def set_gates(model, value: float):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("attn_gate", "ff_gate")):
                param.fill_(value)
    return model


def bare_lm(model):
    """The wrapped LM as a plain causal LM with the same weights (media-token rows appended), built from its config
    here: a reference that shares nothing with the model but its weights."""
    text_config = model.config.text_config.__class__(**model.config.text_config.to_dict())
    text_config.vocab_size = model.config.output_vocab_size
    lm = AutoModelForCausalLM.from_config(text_config, dtype=model.dtype).eval()  # buffers as the LM keeps them
    body = model.model.language_model
    state = {}
    for key, value in body.state_dict().items():
        if ".gated_cross_attention." in key or ".media_embedding." in key:
            continue
        state[key.replace(".decoder_layer.", ".")] = value
    media = list(model.config.media_token_ids)  # inside or past the vocabulary; ids between are never used
    embedding = body.get_input_embeddings()  # embed_tokens (Llama, ...), embed_in (GPT-NeoX)
    name = next(name for name, module in body.named_children() if module is embedding)
    embed = embedding.weight.new_zeros(model.config.output_vocab_size, text_config.hidden_size)
    embed[: embedding.weight.shape[0]] = embedding.weight
    embed[media] = embedding.media_embedding.weight
    state[f"{name}.weight"] = embed
    lm.base_model.load_state_dict(state)
    head = torch.zeros_like(embed)
    head[: model.lm_head.weight.shape[0]] = model.lm_head.weight
    head[media] = model.lm_head.media_head.weight
    with torch.no_grad():
        lm.get_output_embeddings().weight.copy_(head)
    return lm


def attention_implementations(model) -> dict[str, str | None]:
    """The attention implementation of the model's config, its sub-configs and every backbone inside it."""
    found = {"config": model.config._attn_implementation}
    for key in ("vision_config", "text_config"):
        found[f"config.{key}"] = getattr(model.config, key)._attn_implementation
    for name, module in model.named_modules():
        if isinstance(module, PreTrainedModel) and name:
            found[name] = module.config._attn_implementation
    return found


def _differences(built: dict, reloaded: dict, prefix: str = "") -> list[str]:
    """The keys whose values differ between two config dicts (nested keys dotted), but for where it was loaded from."""
    found = []
    for key in sorted(set(built) | set(reloaded), key=str):
        a, b = built.get(key), reloaded.get(key)
        if key in ("_name_or_path", "transformers_version") or a == b:
            continue
        if key == "dtype" and a is None:  # not stated: the weights' dtype, which the saved config states
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{key}.")
        else:
            found.append(f"{prefix}{key}: {a!r} built, {b!r} reloaded")
    return found


def _buffer_differences(built, reloaded) -> list[str]:
    """Buffers (e.g. rotary frequencies) that differ in dtype or value between the built and the reloaded model."""
    theirs = dict(reloaded.named_buffers())
    return [
        f"{name}: {mine.dtype} built, {theirs[name].dtype} reloaded"
        for name, mine in built.named_buffers()
        if name in theirs and (mine.dtype != theirs[name].dtype or not torch.equal(mine, theirs[name]))
    ]


def _trainable(model) -> list[tuple[str, torch.dtype]]:
    return [(name, p.dtype) for name, p in model.named_parameters() if p.requires_grad]


def _inputs(model, seed: int, batch: int = 2, length: int = 12) -> dict[str, torch.Tensor]:
    """A batch with one image at the front of each row, two context pages, and plain tokens."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    vision = config.vision_config
    size, channels = vision.image_size, getattr(vision, "num_channels", 3)
    vocab = min(config.text_config.vocab_size, 2**15)
    tokens = torch.randint(0, vocab, (batch, length - 1), generator=generator)
    tokens = torch.where(torch.isin(tokens, torch.tensor(config.media_token_ids)), 1, tokens)
    image = torch.full((batch, 1), config.image_token_id)
    dtype = model.dtype
    return dict(
        input_ids=torch.cat([image, tokens], dim=1),
        attention_mask=torch.ones(batch, length, dtype=torch.long),
        pixel_values=torch.randn(batch, 1, channels, size, size, generator=generator).to(dtype),
        context_pixel_values=torch.randn(batch, 2, channels, size, size, generator=generator).to(dtype),
    )


def _generate(model, inputs, use_cache: bool = True):
    pad = model.generation_config.pad_token_id
    out = model.generate(
        **inputs,
        max_new_tokens=5,
        do_sample=False,
        use_cache=use_cache,
        eos_token_id=None,  # always five new tokens, however the model's eos is set
        pad_token_id=0 if pad is None else pad,
        output_scores=True,
        return_dict_in_generate=True,
    )
    return out.sequences, torch.stack(out.scores)


@torch.no_grad()
def measure(model, reload=None, references: dict | None = None, seeds: int = 4) -> dict:
    """The invariants' numbers for `model` (its gates are changed). `reload(folder)` loads a saved folder the way
    this model's users do (skipped when None); `references` maps names to causal LMs that must equal the model at
    zero gates (the bare LM built here is always one)."""
    model.eval()
    result = {"attention": attention_implementations(model)}
    vocab = model.config.text_config.vocab_size

    set_gates(model, 0.5)  # open: the media reach the language model
    causal = 0.0
    for seed in range(seeds):
        inputs = _inputs(model, seed)
        cut = 2 + seed * (inputs["input_ids"].shape[1] - 3) // max(seeds - 1, 1)  # 2 .. length - 1
        changed = dict(inputs, input_ids=inputs["input_ids"].clone())
        changed["input_ids"][:, cut:] = _inputs(model, seed + 100)["input_ids"][:, cut:]
        a, b = model(**inputs).logits[:, :cut], model(**changed).logits[:, :cut]
        causal = max(causal, (a.float() - b.float()).abs().max().item())
    result["causal"] = causal
    # the media reach the language model: other pixels (image and pages) change the logits after them
    inputs = _inputs(model, seeds)
    other = _inputs(model, seeds + 100)
    swapped = dict(inputs, pixel_values=other["pixel_values"], context_pixel_values=other["context_pixel_values"])
    result["media_effect"] = (model(**inputs).logits.float() - model(**swapped).logits.float()).abs().max().item()
    cached_tokens, cached_scores = _generate(model, inputs, use_cache=True)
    tokens, scores = _generate(model, inputs, use_cache=False)
    result["cache_tokens_equal"] = torch.equal(cached_tokens, tokens)
    result["cache_scores"] = (cached_scores.float() - scores.float()).abs().max().item()

    if reload is not None:
        logits = model(**inputs).logits
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            reloaded = reload(folder).eval()
        result["reload_attention"] = attention_implementations(reloaded)
        result["reload_config_differs"] = _differences(model.config.to_dict(), reloaded.config.to_dict())
        result["reload_config_differs"] += _differences(
            model.generation_config.to_dict(), reloaded.generation_config.to_dict(), "generation_config."
        )
        result["reload_trainable_equal"] = _trainable(model) == _trainable(reloaded)
        result["reload_buffers_differ"] = _buffer_differences(model, reloaded)
        result["reload_logits"] = (reloaded(**inputs).logits.float() - logits.float()).abs().max().item()
        result["reload_tokens_equal"] = torch.equal(_generate(reloaded, inputs)[0], cached_tokens)
        del reloaded

    set_gates(model, 0.0)
    plain = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    plain["input_ids"] = torch.where(plain["input_ids"] == model.config.image_token_id, 1, plain["input_ids"])
    logits = model(**plain).logits[..., :vocab].float()
    result["zero_gates"] = {}
    for name, lm in {"bare": bare_lm(model), **(references or {})}.items():
        reference = lm.eval()(**plain).logits.float()
        width = min(vocab, reference.shape[-1])  # the LM's own vocabulary (the model's may be padded for its tokenizer)
        result["zero_gates"][name] = (logits[..., :width] - reference[..., :width]).abs().max().item()
    return result


def violations(result: dict, zero_gate_tolerance: float = 1e-5, warnings_allowed: tuple[str, ...] = ()) -> list[str]:
    """What in `result` (from `measure`, with the `warnings` recorded around it) breaks an invariant."""
    found = []
    unset = {k: v for k, v in result["attention"].items() if v is None}
    if unset:
        found.append(f"attention implementation not set (attention runs unmasked): {sorted(unset)}")
    if result["causal"] != 0.0:
        found.append(f"not causal: logits before a changed token moved by {result['causal']:.3g}")
    if result["media_effect"] < 1e-4:
        found.append(
            f"the media do not reach the language model: other pixels move the logits by {result['media_effect']:.3g}"
        )
    if not result["cache_tokens_equal"] or result["cache_scores"] >= 1e-4:
        found.append(
            f"cached generation differs from uncached: tokens equal {result['cache_tokens_equal']}, "
            f"scores by {result['cache_scores']:.3g}"
        )
    for name, delta in result["zero_gates"].items():
        if delta > zero_gate_tolerance:
            found.append(f"zero gates, no media: logits differ from the {name} language model by {delta:.3g}")
    if "reload_logits" in result:
        if result["reload_attention"] != result["attention"]:
            found.append(f"reloaded attention {result['reload_attention']} != built {result['attention']}")
        found.extend(f"saved and reloaded config differs: {d}" for d in result["reload_config_differs"])
        found.extend(f"saved and reloaded buffer differs: {d}" for d in result["reload_buffers_differ"])
        if not result["reload_trainable_equal"]:
            found.append("saved and reloaded: different trainable parameters (or dtypes)")
        if result["reload_logits"] != 0.0 or not result["reload_tokens_equal"]:
            found.append(
                f"saved and reloaded: logits differ by {result['reload_logits']:.3g}, "
                f"generated tokens equal {result['reload_tokens_equal']}"
            )
    unexplained = [w for w in result.get("warnings", []) if not any(a in w for a in warnings_allowed)]
    found.extend(f"warning: {w}" for w in unexplained)
    return found


def check(result: dict, **tolerances) -> None:
    """Asserts every invariant at once, listing all that fail."""
    found = violations(result, **tolerances)
    assert not found, "\n".join(found)


if __name__ == "__main__":  # python model_invariants.py FOLDER: a remote-code folder, measured where it is loaded
    import sys

    sys.modules["visincontext"] = None  # not importable here: only the folder's remote code may be used
    from transformers import AutoModelForImageTextToText

    def load(folder):
        return AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)

    with library_warnings() as said:
        model = load(sys.argv[1])
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        measured = measure(model, reload=load)
    measured["warnings"] = said
    print("RESULT", json.dumps(measured))
