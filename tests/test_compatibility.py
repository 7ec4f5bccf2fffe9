"""The stack moves under a user: the package must hold on the transformers a fresh install gets.

For the lowest transformers the package declares and for the newest release its declared range admits (resolved
by pip when the test runs), a fresh virtual environment gets torch (this machine's wheel), that transformers,
pillow and pytest, nothing else. In it:
- the tests marked `invariant` run against this checkout (zero gates = bare LM, cache = no cache with media encoded
  once, save -> `Auto*` load, batched = one by one, the private hooks the model overrides);
- a Hub folder written here by `hub.prepare_repo` loads with `trust_remote_code=True` where `visincontext` is not
  installed, and generates the tokens it generates here.
"""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tomllib
import torch
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
INVARIANT_TESTS = ["tests/test_modeling.py", "tests/test_processing.py"]
PROMPT, CONTEXT = "<image>Question: capital? Answer:", "Fact: the capital of Atlantis is Poseidonia. " * 4


def declared_transformers() -> Requirement:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(Requirement(d) for d in map(str, dependencies) if Requirement(d).name == "transformers")


def lowest_declared() -> str:
    lower = [s.version for s in declared_transformers().specifier if s.operator in (">=", "==")]
    assert len(lower) == 1, f"pyproject.toml: expected one lower bound for transformers, got {lower}"
    return lower[0]


def test_declared_range_has_one_lower_bound():
    requirement = declared_transformers()
    assert requirement.specifier.contains(lowest_declared())
    assert any(s.operator == "<" for s in requirement.specifier)  # the next major release is not assumed to work


def fresh_environment(folder: Path, transformers_requirement: str) -> tuple[Path, str]:
    """A new venv with this torch, the given transformers, pillow and pytest. Returns (python, transformers version)."""
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    python = folder / "bin" / "python"
    torch_version = torch.__version__.split("+")[0]
    install = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            f"torch=={torch_version}",
            transformers_requirement,
            "pillow",
            "pytest",
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    version = subprocess.run(
        [str(python), "-c", "import transformers; print(transformers.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return python, version


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory):
    """A Hub-ready folder of a small model with open gates, and the tokens it generates here."""
    from PIL import Image

    from visincontext.hub import prepare_repo
    from visincontext.training import DataArguments, ModelArguments, build_model_and_processor

    model, processor = build_model_and_processor(ModelArguments(), DataArguments())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("attn_gate", "ff_gate")):
                param.fill_(0.7)
    out = prepare_repo(model.eval(), processor, tmp_path_factory.mktemp("hub") / "repo")
    inputs = processor(
        images=[Image.new("RGB", (40, 30), (200, 30, 30))], text=PROMPT, context=CONTEXT, return_tensors="pt"
    )
    expected = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0].tolist()
    return out, expected


LOAD_FOLDER = """
import importlib.util, json, sys
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
assert importlib.util.find_spec("visincontext") is None, "visincontext must not be importable here"
folder, prompt, context = sys.argv[1:4]
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
image = Image.new("RGB", (40, 30), (200, 30, 30))
inputs = processor(images=[image], text=prompt, context=context, return_tensors="pt")
print("TOKENS", json.dumps(model.generate(**inputs, max_new_tokens=8, do_sample=False)[0].tolist()))
"""


@pytest.mark.slow
@pytest.mark.parametrize("end", ["lowest declared", "newest released"])
def test_fresh_environment_keeps_the_invariants_and_loads_a_hub_folder(end, hub_folder, tmp_path):
    requirement = f"transformers=={lowest_declared()}" if end == "lowest declared" else str(declared_transformers())
    python, version = fresh_environment(tmp_path / "venv", requirement)
    if end == "lowest declared":
        assert Version(version) == Version(lowest_declared()), version
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{ROOT / 'tests'}")
    env.pop("VIRTUAL_ENV", None)
    tests = subprocess.run(
        [str(python), "-m", "pytest", "-m", "invariant", "-q", "-p", "no:cacheprovider", *INVARIANT_TESTS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    summary = tests.stdout.strip().splitlines()[-1] if tests.stdout.strip() else ""
    print(f"{end}: transformers {version}: {summary}")
    assert tests.returncode == 0, tests.stdout[-4000:] + tests.stderr[-2000:]
    assert re.search(r"\d+ passed", summary) and "failed" not in summary and "error" not in summary, summary

    folder, expected = hub_folder
    bare = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    loaded = subprocess.run(
        [str(python), "-c", textwrap.dedent(LOAD_FOLDER), str(folder), PROMPT, CONTEXT],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=bare,
        timeout=600,
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    tokens = json.loads(loaded.stdout.split("TOKENS")[1].strip())
    assert tokens == expected, (version, tokens, expected)
