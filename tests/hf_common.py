"""transformers' own common test suites, fetched at test time from the installed version's sdist.

The suites are not copied into this repository: `pip download` fetches the sdist once into a cache folder,
and the three `*_common.py` files are extracted into a package named `hf_common_tests`, beside small
stand-ins for the sibling modules the sdist does not ship (generation and export testers, a config
fixture, and a hub-fixture helper that writes a local PNG instead of downloading).
"""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import transformers

COMMON_FILES = ("test_modeling_common.py", "test_processing_common.py", "test_configuration_common.py")
STUBS = {
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
    "utils/test_configuration_utils.py": "config_common_kwargs = {}\n",
}
FETCH_HELPER = '''
import hashlib
from pathlib import Path

import numpy as np
from PIL import Image


def url_to_local_path(url, *args, **kwargs):
    """Stand-in for the CI fixture fetcher: a deterministic local image for any URL."""
    folder = Path(__file__).parent / "fixtures"
    folder.mkdir(exist_ok=True)
    path = folder / (hashlib.sha1(url.encode()).hexdigest() + ".png")
    if not path.exists():
        seed = int(hashlib.sha1(url.encode()).hexdigest()[:8], 16)
        pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
    return str(path)
'''


def ensure_common_tests() -> Path:
    """Returns the folder to put on `sys.path` so that `import hf_common_tests.test_modeling_common` works."""
    root = Path(os.environ.get("VISINCONTEXT_TEST_CACHE", Path.home() / ".cache" / "visincontext-tests"))
    root = root / f"transformers-{transformers.__version__}"
    package = root / "hf_common_tests"
    if not (package / "test_modeling_common.py").exists():
        download = root / "sdist"
        download.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "-q",
                f"transformers=={transformers.__version__}",
                "-d",
                str(download),
            ],
            check=True,
        )
        (archive,) = download.glob("transformers-*.tar.gz")
        package.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if len(parts) == 3 and parts[1] == "tests" and parts[2] in COMMON_FILES:
                    (package / parts[2]).write_bytes(tar.extractfile(member).read())
        for relative, text in STUBS.items():
            path = package / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            (path.parent / "__init__.py").touch()
        (package / "__init__.py").touch()
        utils = root / "utils"
        utils.mkdir(exist_ok=True)
        (utils / "fetch_hub_objects_for_ci.py").write_text(FETCH_HELPER)
    for folder in (root, root / "utils"):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    return root
