"""Safe, atomic outputs: a result is complete under its final name or absent, and nothing else is lost.

Every directory this library writes carries a manifest (:data:`MANIFEST_FILE`) naming what wrote it
and the entries it holds. ``overwrite`` replaces only such a directory, and only when it holds
nothing beyond what the manifest lists; it never replaces the working directory or a parent of it,
a repository root, the home directory, a symbolic link, or a directory of someone else's files.
:func:`check_output_dir` applies those rules before a run starts, so a refusal costs no work;
:func:`atomic_directory` applies them again when the result is moved into place.

Results are staged in a hidden sibling directory named after the process that writes it; a stage
left behind by a killed process is removed the next time that output is written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANIFEST_FILE = "ipg_manifest.json"
_STAGE_SUFFIXES = (".partial", ".replaced")


class UnsafeOverwriteError(FileExistsError):
    """An existing directory that ``overwrite`` must not replace; the message says why and what to do."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _stage_tag() -> str:
    """``host-pid`` of this process: a stage left by a dead process on this host is stale."""
    return f"{socket.gethostname().replace('.', '_')}-{os.getpid()}"


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp's 0600 would leak into the final file
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | Path, payload: Any) -> Path:
    """Write ``payload`` as indented JSON, atomically."""
    return atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """The manifest of a directory this library wrote, or None if it has none (or an unreadable one)."""
    try:
        manifest = json.loads((Path(directory) / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("written_by") != "ipg_lightning" or not isinstance(manifest.get("files"), list):
        return None
    return manifest


def _package_version() -> str:
    try:
        return version("ipg-lightning")
    except PackageNotFoundError:
        return "unknown"


def _write_manifest(staging: Path, kind: str) -> None:
    files = sorted(entry.name for entry in staging.iterdir() if entry.name != MANIFEST_FILE)
    manifest = {
        "written_by": "ipg_lightning",
        "version": _package_version(),
        "kind": kind,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else None,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": files,
    }
    atomic_write_json(staging / MANIFEST_FILE, manifest)


def _refuse(path: Path, why: str, fix: str) -> UnsafeOverwriteError:
    return UnsafeOverwriteError(f"Refusing to overwrite {path}: {why}; {fix}")


def _check_replaceable(path: Path) -> None:
    """Raise unless ``path`` is an earlier output of this library that may be replaced as a whole."""
    another = "choose another output directory"
    if path.is_symlink():
        raise _refuse(path, "it is a symbolic link", another)
    if not path.is_dir():
        raise _refuse(path, "it is a file, not an output directory", another)
    resolved, cwd = path.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise _refuse(path, "it is the working directory or contains it", "name a new sub-directory instead")
    if resolved == Path.home().resolve() or resolved.parent == resolved:
        raise _refuse(path, "it is the home or the root directory", another)
    if (resolved / ".git").exists():
        raise _refuse(path, "it is the root of a repository", another)
    entries = {entry.name for entry in path.iterdir()}
    manifest = read_manifest(path)
    if manifest is None:
        if entries:
            raise _refuse(path, f"it holds files that ipg_lightning did not write (no {MANIFEST_FILE})",
                          f"{another}, or move those files away first")
        return
    extra = sorted(entries - set(manifest["files"]) - {MANIFEST_FILE})
    if extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise _refuse(path, f"it holds entries the earlier run did not write ({shown})", f"{another}, or move them away first")


def check_output_dir(path: str | Path, overwrite: bool = False) -> Path:
    """Check, before any work starts, that a result may be written to ``path``.

    A missing ``path`` is fine. An existing one is refused unless ``overwrite`` is set, and even
    then unless it is an earlier output of this library (see the module docstring).
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise FileExistsError(
                f"{path} already exists; choose another output directory, or set overwrite (--overwrite true; "
                "--model.overwrite true for ipg attribute) to replace an earlier ipg_lightning output there"
            )
        _check_replaceable(path)
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_stages(path: str | Path) -> list[Path]:
    """Remove staging directories beside ``path`` that a killed process of this host left behind."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    host = socket.gethostname().replace(".", "_")
    removed = []
    for candidate in path.parent.glob(f".{path.name}.*"):
        parts = candidate.name[len(path.name) + 2 :].split(".")
        if not candidate.is_dir() or len(parts) != 3 or f".{parts[2]}" not in _STAGE_SUFFIXES:
            continue
        owner_host, _, pid = parts[0].rpartition("-")
        if owner_host != host or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        shutil.rmtree(candidate, ignore_errors=True)
        log.warning("removed %s, left by an interrupted run (process %s)", candidate, pid)
        removed.append(candidate)
    return removed


def _make_readable(root: Path) -> None:
    """Give staged files and folders the modes of ordinary new files (some writers use 0600)."""
    mask = _umask()
    for folder, _, files in os.walk(root):
        os.chmod(folder, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~mask)


@contextmanager
def atomic_directory(path: str | Path, overwrite: bool = False, kind: str = "output") -> Iterator[Path]:
    """Yield a staging directory beside ``path``; on success it becomes ``path``, with a manifest.

    On any error (or interruption) the staging directory is removed and ``path`` is untouched. An
    existing ``path`` is refused unless ``overwrite`` is set and it may be replaced (see
    :func:`check_output_dir`); the old directory is removed only after the new one is in place.

    Args:
        path: the final directory.
        overwrite: replace an earlier output of this library at ``path``.
        kind: what is written (e.g. ``attribution report``), recorded in the manifest.
    """
    path = Path(path)
    check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_stages(path)
    tag = _stage_tag()
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{tag}.", suffix=".partial"))
    try:
        yield staging
        _write_manifest(staging, kind)
        _make_readable(staging)
        check_output_dir(path, overwrite)  # the target may have changed while the work ran
        replaced = None
        if path.exists():
            replaced = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{tag}.", suffix=".replaced"))
            os.replace(path, replaced / path.name)
        os.replace(staging, path)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
