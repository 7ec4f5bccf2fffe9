"""The stack moves under a user: the package must hold on the transformers a fresh install gets.

For the lowest transformers the package declares and for the newest release on the package index that its declared
range admits, a fresh virtual environment gets torch (this machine's wheel), that transformers, pillow and pytest,
nothing else. In it:
- the tests marked `invariant` run against this checkout (zero gates = bare LM, cache = no cache with media encoded
  once, save -> `Auto*` load, batched = one by one, the private hooks the model overrides);
- a Hub folder written here by `hub.prepare_repo` loads with `trust_remote_code=True` where `visincontext` is not
  installed, and generates the tokens it generates here.
A release can require a package the index does not have yet (transformers 5.25.0 requires `kernels>=0.19.1`; this
machine's index stops at 0.17.2), so pip installs the release before it. The newest release is then installed without
that package, run the way transformers runs without it, and the test says so. A second test checks that the package's
own pins hold nothing back: with them, pip picks the transformers it picks for transformers alone.
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
INVARIANT_TESTS = ["tests/test_modeling.py", "tests/test_processing.py", "tests/test_construction.py"]
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


def index_releases() -> list[Version]:
    """The final transformers releases on the package index pip is configured with (`pip index versions`)."""
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", "transformers"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    available = re.search(r"Available versions: (.+)", listing)
    assert available, listing
    return [v for v in map(Version, available.group(1).split(", ")) if not v.is_prerelease]


def newest_released() -> str:
    """The newest release on the index that the declared range admits."""
    return str(max(v for v in index_releases() if declared_transformers().specifier.contains(v)))


# Requirements of a transformers release that the index may not have yet, and the environment transformers runs
# without each. 5.25 loads every model through `kernels` unless USE_HUB_KERNELS says not to
# (transformers/integrations/hub_kernels.py: `_kernels_enabled`).
RUNS_WITHOUT = {"kernels": {"USE_HUB_KERNELS": "0"}}


def pip_install(python: Path, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(python), "-m", "pip", "install", "-q", *arguments], capture_output=True, text=True, timeout=1200
    )


def fresh_environment(folder: Path, version: str) -> tuple[Path, dict[str, str], str | None]:
    """A new venv with this torch, transformers `version`, pillow and pytest.

    Returns (python, environment variables transformers needs here, the requirement the index lacks or None)."""
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    python = folder / "bin" / "python"
    base = [f"torch=={torch.__version__.split('+')[0]}", "pillow", "pytest"]
    install = pip_install(python, *base, f"transformers=={version}")
    overrides, missing = {}, None
    if install.returncode != 0:
        lacking = re.search(r"No matching distribution found for (\S+)", install.stderr)
        assert lacking and Requirement(lacking.group(1)).name in RUNS_WITHOUT, install.stderr[-3000:]
        missing = lacking.group(1)
        assert pip_install(python, "--no-deps", f"transformers=={version}").returncode == 0
        requires = subprocess.run(
            [str(python), "-c", "from importlib.metadata import requires; print(*requires('transformers'), sep='\\n')"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\n")
        needed = [
            r
            for r in map(Requirement, filter(None, requires))
            if r.name != Requirement(missing).name and (r.marker is None or r.marker.evaluate({"extra": ""}))
        ]
        install = pip_install(python, *base, *map(str, needed))
        assert install.returncode == 0, install.stderr[-3000:]
        overrides = RUNS_WITHOUT[Requirement(missing).name]
    installed = subprocess.run(
        [str(python), "-c", "import transformers; print(transformers.__version__)"],
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ, **overrides),
    ).stdout.strip()
    assert Version(installed) == Version(version), (installed, version)
    return python, overrides, missing


def resolved_transformers(*requirements: str) -> str:
    """The transformers pip would install for `requirements` into an empty environment (a dry run)."""
    report = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "-q",
            "--report",
            "-",
            *requirements,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    chosen = json.loads(report.stdout)["install"]
    return next(item["metadata"]["version"] for item in chosen if item["metadata"]["name"] == "transformers")


@pytest.mark.slow
def test_the_package_pins_hold_back_no_transformers_release():
    """What a user's `pip install visincontext[test]` resolves is the transformers pip picks for it alone."""
    alone = resolved_transformers(str(declared_transformers()))
    assert resolved_transformers("-e", ".[test]") == alone
    print(f"pip resolves transformers {alone} with and without the package's pins; newest released {newest_released()}")


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
    version = lowest_declared() if end == "lowest declared" else newest_released()
    python, overrides, missing = fresh_environment(tmp_path / "venv", version)
    env = dict(os.environ, HF_HUB_OFFLINE="1", **overrides, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{ROOT / 'tests'}")
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
    without = f" without {missing} (not on the index; {overrides})" if missing else ""
    print(f"{end}: transformers {version}{without}: {summary}")
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
