"""Safe, atomic outputs: a result is complete under its final name or absent, and nothing else is lost.

Every directory this library writes carries a manifest (:data:`MANIFEST_FILE`) naming what wrote it
and the entries it holds. ``overwrite`` replaces only such a directory, and only when it holds
nothing beyond what the manifest lists; it never replaces the working directory or a parent of it,
a repository root, the home directory, a symbolic link, or a directory of someone else's files.
:func:`check_output_dir` applies those rules before a run starts, so a refusal costs no work;
:func:`atomic_directory` applies them again when the result is moved into place.

Results are staged in a hidden sibling directory that the writing process holds a lock on; a stage
nobody holds was left by a killed process and is removed the next time that output is written.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
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
    """``host-pid`` of this process, so that a person can tell whose staging directory it is."""
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


def _relative_files(root: Path) -> set[str]:
    """Every file and symbolic link under ``root``, as paths relative to it (folders are implied)."""
    found = set()
    for folder, folders, files in os.walk(root):
        links = [name for name in folders if os.path.islink(os.path.join(folder, name))]
        for name in [*files, *links]:
            found.add(Path(folder, name).relative_to(root).as_posix())
    return found


def _write_manifest(staging: Path, kind: str) -> None:
    files = sorted(_relative_files(staging) - {MANIFEST_FILE})
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
    manifest = read_manifest(path)
    if manifest is None:
        if any(path.iterdir()):
            raise _refuse(path, f"it holds files that ipg_lightning did not write (no {MANIFEST_FILE})", f"{another}, or move those files away first")
        return
    extra = sorted(_relative_files(path) - set(manifest["files"]) - {MANIFEST_FILE})
    if extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise _refuse(path, f"it holds entries the earlier run did not write ({shown})", f"{another}, or move them away first")


def check_output_dir(path: str | Path, overwrite: bool = False) -> Path:
    """Check, before any work starts, that a result may be written to ``path``.

    A missing ``path`` is fine. An existing one is refused unless ``overwrite`` is set, and even
    then unless it is an earlier output of this library (see the module docstring). Stages that a
    killed run of this output left behind are cleaned up first (:func:`remove_stale_stages`).
    """
    path = Path(path)
    remove_stale_stages(path)
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise FileExistsError(
                f"{path} already exists; choose another output directory, or set overwrite (--overwrite true; "
                "--model.overwrite true for ipg attribute) to replace an earlier ipg_lightning output there"
            )
        _check_replaceable(path)
    return path


@contextmanager
def _held(stage: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``stage`` (a directory) while it is in use; the kernel drops it when the
    process dies, however it dies, so a stage nobody holds was left by a dead process."""
    handle = os.open(stage, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # a filesystem without locks: write anyway; its stages are then never judged stale
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)


def _abandoned(stage: Path) -> bool:
    try:
        handle = os.open(stage, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # a live process holds it (or locks are unsupported here: keep it)
    finally:
        os.close(handle)
    return True


def remove_stale_stages(path: str | Path) -> list[Path]:
    """Clean up after a run of this output that was killed while writing it.

    Its staging directory (an unfinished result) is removed. If it was killed while swapping an old
    result for a new one, so that ``path`` is missing, the old result is first put back.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    removed = []
    for stage in sorted(path.parent.glob(f".{glob.escape(path.name)}.*")):
        if not (stage.is_dir() and stage.name.endswith(_STAGE_SUFFIXES) and _abandoned(stage)):
            continue
        displaced = stage / path.name
        if stage.name.endswith(".replaced") and displaced.is_dir() and not path.exists():
            try:
                os.replace(displaced, path)
            except OSError:  # another process (a DDP rank) got there first
                continue
            log.warning("restored %s from %s, left by an interrupted run", path, stage)
        shutil.rmtree(stage, ignore_errors=True)
        log.warning("removed %s, left by an interrupted run", stage)
        removed.append(stage)
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
    tag = _stage_tag()
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{tag}.", suffix=".partial"))
    try:
        with _held(staging):
            yield staging
            _write_manifest(staging, kind)
            _make_readable(staging)
            check_output_dir(path, overwrite)  # the target may have changed while the work ran
            if not path.exists():
                os.replace(staging, path)
                return
            replaced = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{tag}.", suffix=".replaced"))
            with _held(replaced):
                os.replace(path, replaced / path.name)
                os.replace(staging, path)
            shutil.rmtree(replaced, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
