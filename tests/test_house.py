"""The house stays small and has one door per datum (issue: the house for the next reader): no module of the package
over 700 lines, no class over 250, no `forward` over 60; the training data path uses no private name of the
processor."""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "visincontext"
LIMITS = {"module": 700, "class": 250, "forward": 60}


def sizes() -> dict[str, dict[str, int]]:
    found = {kind: {} for kind in LIMITS}
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        name = str(path.relative_to(PACKAGE))
        found["module"][name] = len(text.splitlines())
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                found["class"][f"{name}:{node.name}"] = node.end_lineno - node.lineno + 1
                for item in node.body:
                    if isinstance(item, ast.FunctionDef) and item.name == "forward":
                        found["forward"][f"{name}:{node.name}.forward"] = item.end_lineno - item.lineno + 1
    return found


def test_no_module_class_or_forward_is_over_its_limit():
    found = sizes()
    assert len(found["module"]) > 20 and "modeling_visincontext.py" in found["module"]  # the walk saw the package
    assert "modeling_visincontext.py:VisInContextForConditionalGeneration.forward" in found["forward"]
    over = {kind: {k: v for k, v in found[kind].items() if v > LIMITS[kind]} for kind in LIMITS}
    assert over == {kind: {} for kind in LIMITS}, over


def test_the_data_path_uses_no_private_name_of_the_processor():
    source = (PACKAGE / "data.py").read_text()
    tree = ast.parse(source)
    private_imports = [
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("processing_visincontext")
        for alias in node.names
        if alias.name.startswith("_")
    ]
    assert private_imports == []
    assert re.findall(r"processor\._[a-z]\w*", source) == []
