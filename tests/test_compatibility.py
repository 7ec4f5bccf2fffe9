"""The stack moves under a user: the package must hold on the torch and transformers a fresh install gets.

For three torch releases (the lowest the package declares, this machine's, and the newest release on the package
index that its range admits) and, in each, two transformers releases (the lowest declared and the newest released
that the range admits), a fresh virtual environment gets that torch, that transformers, pillow and pytest, nothing
else. In it:
- the tests marked `invariant` run against this checkout (zero gates = bare LM, cache = no cache with media encoded
  once, save -> `Auto*` load, batched = one by one, every constructor causal, the private hooks the model overrides);
- a Hub folder written here by `hub.prepare_repo` loads with `trust_remote_code=True` where `visincontext` is not
  installed, and generates the tokens it generates here.
A release can require a package the index does not have yet (transformers 5.25.0 requires `kernels>=0.19.1`; this
machine's index stops at 0.17.2), so pip installs the release before it. The newest release is then installed without
that package, run the way transformers runs without it, and the test says so. A second test checks that the package's
own pins hold nothing back: with them, pip picks the transformers it picks for transformers alone. torch releases
other than this machine's come from the package index (CUDA builds, which run on a CPU), past any local cap on torch
(pip's configuration files are not read for them).
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


def declared(name: str = "transformers") -> Requirement:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(Requirement(d) for d in map(str, dependencies) if Requirement(d).name == name)


def declared_transformers() -> Requirement:
    return declared("transformers")


def lowest_declared(name: str = "transformers") -> str:
    lower = [s.version for s in declared(name).specifier if s.operator in (">=", "==")]
    assert len(lower) == 1, f"pyproject.toml: expected one lower bound for {name}, got {lower}"
    return lower[0]


def test_declared_range_has_one_lower_bound():
    requirement = declared_transformers()
    assert requirement.specifier.contains(lowest_declared())
    assert any(s.operator == "<" for s in requirement.specifier)  # the next major release is not assumed to work
    # torch: a lower bound that the declared transformers and accelerate accept too, and no upper cap on a minor
    # release (a new torch is tested here when it is released, as the newest released end)
    assert declared("torch").specifier.contains(lowest_declared("torch"))
    assert Version(lowest_declared("torch")) >= Version("2.6")  # transformers 5 and accelerate 1.16 need 2.6
    assert not any(s.operator in ("<", "<=") for s in declared("torch").specifier), declared("torch")


def index_releases(name: str = "transformers") -> list[Version]:
    """The final releases of `name` on the package index pip is configured with (`pip index versions`)."""
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", name],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    available = re.search(r"Available versions: (.+)", listing)
    assert available, listing
    return [v for v in map(Version, available.group(1).split(", ")) if not v.is_prerelease and not v.local]


def newest_released(name: str = "transformers") -> str:
    """The newest release on the index that the declared range admits."""
    return str(max(v for v in index_releases(name) if declared(name).specifier.contains(v)))


THIS_TORCH = torch.__version__.split("+")[0]


# Requirements of a transformers release that the index may not have yet, and the environment transformers runs
# without each. 5.25 loads every model through `kernels` unless USE_HUB_KERNELS says not to
# (transformers/integrations/hub_kernels.py: `_kernels_enabled`).
RUNS_WITHOUT = {"kernels": {"USE_HUB_KERNELS": "0"}}


def pip_install(python: Path, *arguments: str, config: bool = True) -> subprocess.CompletedProcess:
    """pip install into the venv of `python`; with `config=False`, without pip's configuration files."""
    env = dict(os.environ) if config else dict(os.environ, PIP_CONFIG_FILE=os.devnull)
    return subprocess.run(
        [str(python), "-m", "pip", "install", "-q", *arguments], capture_output=True, text=True, timeout=1200, env=env
    )


def torch_environment(folder: Path, torch_version: str) -> Path:
    """A new venv with torch `torch_version`, pillow and pytest. Returns its python."""
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    python = folder / "bin" / "python"
    if torch_version == THIS_TORCH:  # this machine's wheel, where pip is configured to find it
        install = pip_install(python, f"torch=={torch_version}", "pillow", "pytest")
    else:  # from the index, past a local cap (pip's configuration files set only that and certificates here)
        install = pip_install(python, f"torch=={torch_version}", "pillow", "pytest", config=False)
    assert install.returncode == 0, install.stderr[-3000:]
    return python


def install_transformers(python: Path, version: str) -> tuple[dict[str, str], str | None]:
    """transformers `version` into the venv of `python` (replacing the one there), keeping its torch.

    Returns (environment variables transformers needs here, the requirement the index lacks or None)."""
    kept = subprocess.run(
        [str(python), "-c", "from importlib.metadata import version; print(version('torch'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    pin, config = f"torch=={kept}", kept.split("+")[0] == THIS_TORCH
    install = pip_install(python, pin, f"transformers=={version}", config=config)
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
        install = pip_install(python, pin, *map(str, needed), config=config)
        assert install.returncode == 0, install.stderr[-3000:]
        overrides = RUNS_WITHOUT[Requirement(missing).name]
    installed = subprocess.run(
        [str(python), "-c", "from importlib.metadata import version; print(version('torch'), version('transformers'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert installed[0] == kept and Version(installed[1]) == Version(version), (installed, kept, version)
    return overrides, missing


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


TORCH_ENDS = {"lowest declared": lambda: lowest_declared("torch"), "this machine's": lambda: THIS_TORCH}
TORCH_ENDS["newest released"] = lambda: newest_released("torch")
TRANSFORMERS_ENDS = {"lowest declared": lowest_declared, "newest released": newest_released}


@pytest.mark.slow
@pytest.mark.parametrize("torch_end", list(TORCH_ENDS))
def test_fresh_environment_keeps_the_invariants_and_loads_a_hub_folder(torch_end, hub_folder, tmp_path, subtests):
    """One venv per torch release; in it, the lowest declared and the newest released transformers in turn."""
    torch_version = TORCH_ENDS[torch_end]()
    python = torch_environment(tmp_path / "venv", torch_version)
    for end, version in ((end, find()) for end, find in TRANSFORMERS_ENDS.items()):
        with subtests.test(transformers=end):
            check_environment(
                python,
                f"torch {torch_version} ({torch_end}), transformers {version} ({end})",
                version,
                hub_folder,
                tmp_path,
            )


def check_environment(python: Path, name: str, version: str, hub_folder, tmp_path: Path) -> None:
    overrides, missing = install_transformers(python, version)
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
    print(f"{name}{without}: {summary}")
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
