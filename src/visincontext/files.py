"""Writing outputs safely: check first, write whole or not at all, leave no litter behind a crash.

A file is written to a temporary sibling (`.name.tmp-PID`) and moved into place with `os.replace`, so readers see
the old file or the new one, never half of one. A folder is assembled in a sibling staging folder
(`.name.staging-PID`) and moved the same way. What a killed process leaves behind carries its PID: the next run
in the same place removes the leftovers of processes that are no longer alive.
"""

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def check_writable(name: str, path: str | Path) -> Path:
    """`path` can be written as a file: not an existing folder, its folder exists or can be made, and is writable.
    Raises `ValueError` naming `name` (the argument as the user wrote it) before any work starts."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{name}: {str(path)!r} is a folder; expected a file path")
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.check-"):
            pass
    except OSError as error:
        raise ValueError(f"{name}: cannot write in {str(folder)!r} ({error.strerror or error})") from None
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(path: str | Path) -> list[Path]:
    """Removes `.name.tmp-PID` files and `.name.staging-PID` folders beside `path` whose process is gone."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for leftover in path.parent.glob(f".{path.name}.*-*"):
        kind, _, pid = leftover.name[len(path.name) + 2 :].partition("-")
        if kind in ("tmp", "staging") and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
            removed.append(leftover)
    return removed


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Calls `write(temporary_path)` and moves the result to `path` in one step; nothing is left on failure."""
    path = Path(path)
    remove_leftovers(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(str(temporary))
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))


def staging_folder(out_dir: str | Path) -> Path:
    """A new, empty staging folder beside `out_dir` (same file system, so the final move is one rename), after
    removing what killed runs left there."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out_dir)
    staging = out_dir.with_name(f".{out_dir.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


__all__ = ["check_writable", "remove_leftovers", "atomic_write", "atomic_write_text", "staging_folder"]
