"""Quickstart: build a tiny VisInContext model, run it, save it and reload it as remote code.

    python examples/quickstart.py
"""

import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig

from visincontext import VisInContextConfig, VisInContextForConditionalGeneration

OUTPUT_DIR = Path("outputs/quickstart")


def main() -> None:
    start = time.perf_counter()
    torch.manual_seed(0)
    config = VisInContextConfig(
        vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=64, patch_size=16),
        text_config=LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=300),
        num_latents=8, resampler_depth=1, cross_attention_every=1, image_token_id=300, end_of_chunk_token_id=301,
    )
    model = VisInContextForConditionalGeneration(config).eval()
    input_ids = torch.tensor([[300, 10, 11, 12]])
    inputs = dict(input_ids=input_ids, pixel_values=torch.randn(1, 1, 3, 64, 64), context_pixel_values=torch.randn(1, 2, 3, 64, 64))
    generated = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=0)
    print(f"[{time.perf_counter() - start:5.1f}s] built a tiny model and generated {generated[0, 4:].tolist()}")
    model.save_pretrained(OUTPUT_DIR)
    torch.save(inputs, OUTPUT_DIR / "inputs.pt")
    reload = (
        "import sys, torch; sys.modules['visincontext'] = None\n"
        "from transformers import AutoModelForImageTextToText\n"
        f"m = AutoModelForImageTextToText.from_pretrained({str(OUTPUT_DIR)!r}, trust_remote_code=True).eval()\n"
        f"inputs = torch.load({str(OUTPUT_DIR / 'inputs.pt')!r})\n"
        "print(m.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=0)[0, 4:].tolist())\n"
    )
    reloaded = subprocess.run([sys.executable, "-c", reload], check=True, capture_output=True, text=True).stdout.strip()
    print(f"[{time.perf_counter() - start:5.1f}s] reloaded {OUTPUT_DIR} in a fresh process (remote code)")
    print(f"generation from the reloaded folder: {reloaded}")


if __name__ == "__main__":
    main()
