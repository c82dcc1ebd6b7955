"""Safe, atomic outputs: a result is complete under its final name or absent, and nothing else is lost.

Every directory this library writes carries a manifest (:data:`MANIFEST_FILE`) naming what wrote it
and the entries it holds. ``overwrite`` replaces only such a directory, and only when it holds
nothing beyond what the manifest lists; it never replaces the working directory or a parent of it,
a repository root, the home directory, a symbolic link, or a directory of someone else's files.
:func:`check_output_dir` applies those rules before a run starts, so a refusal costs no work;
:func:`atomic_directory` applies them again when the result is moved into place.

Results are staged in a hidden sibling directory, ``.{name}.{host}-{pid}.{random}.partial``, that the
writing process holds a lock on and marks with a :data:`STAGE_MARKER` file naming the output. A stage
nobody holds was left by a killed process and is removed the next time that output is written, but
only one that provably is this output's own: its exact name and its marker. Anything else beside the
output (another output's stage, a directory a person made) is never touched.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import re
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
#: The file inside a staging directory that says which output it stages (removed before the stage becomes the output).
STAGE_MARKER = ".ipg_stage.json"


class UnsafeOverwriteError(FileExistsError):
    """An existing directory that ``overwrite`` must not replace; the message says why and what to do."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _stage_tag() -> str:
    """``host-pid`` of this process (the host without dots), so that a person can tell whose staging directory it is."""
    return f"{socket.gethostname().replace('.', '_')}-{os.getpid()}"


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a marked, locked staging directory beside it, then rename it into place.

    A stage that a killed process left is removed by the next write of the same ``path``
    (:func:`remove_stale_stages`), and nothing else beside it is ever touched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_stages(path)
    stage = _new_stage(path, ".partial")
    try:
        with _held(stage):
            staged = stage / path.name
            staged.write_bytes(data)
            os.replace(staged, path)
    except BaseException as error:
        failure = _write_failure(path, error)
        shutil.rmtree(stage, ignore_errors=True)
        if failure is not None:
            raise failure from None
        raise
    shutil.rmtree(stage, ignore_errors=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def finite_or_none(value: Any) -> Any:
    """``value`` with every NaN or infinite float (in nested dicts and lists) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(item) for item in value]
    return value


def strict_json(payload: Any, indent: int | None = None) -> str:
    """``payload`` as standard JSON, which has no NaN or Infinity: those values are written as null.

    >>> strict_json({"loss": float("nan"), "steps": [1, float("inf")]})
    '{"loss": null, "steps": [1, null]}'
    """
    return json.dumps(finite_or_none(payload), indent=indent, allow_nan=False)


def atomic_write_json(path: str | Path, payload: Any) -> Path:
    """Write ``payload`` as indented, standard JSON (see :func:`strict_json`), atomically."""
    return atomic_write_text(path, strict_json(payload, indent=2) + "\n")


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
    files = sorted(_relative_files(staging) - {MANIFEST_FILE, STAGE_MARKER})
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


#: OS errors that mean the place cannot take the output (not a bug of the run): named by the output, not the stage.
_WRITE_FAILURES = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG}
#: Below this much free space on its disk an output is refused before any work.
MIN_FREE_BYTES = 1 << 20


class OutputWriteError(OSError):
    """An output that could not be written (a full or read-only disk, ...); the message names the output, not its stage."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"Could not write {path}: {reason}; nothing was written under that name")
        self.reason = reason


def _existing_folder(path: Path) -> Path:
    """The nearest folder above ``path`` that exists (where its missing parents would be created)."""
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _disk_full(path: Path) -> bool:
    try:
        return shutil.disk_usage(_existing_folder(path)).free < MIN_FREE_BYTES
    except OSError:
        return False


def check_writable(path: str | Path) -> Path:
    """Raise before any work if ``path`` cannot be written: it starts with an unexpanded ``~``, its folder is read-only or not
    a folder, or its disk is full."""
    path = Path(path)
    if path.parts and path.parts[0].startswith("~"):
        raise ValueError(f"Cannot write {path}: a leading ~ is expanded by a shell, not in a recipe or from Python; write the full path")
    folder = _existing_folder(path)
    if not folder.is_dir():
        raise NotADirectoryError(f"Cannot write {path}: {folder} is a file, not a directory; choose another output path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"Cannot write {path}: {folder} is read-only or not writable by this user; choose another output path")
    if _disk_full(path):
        raise OSError(f"Cannot write {path}: the disk holding {folder} is full; free some space or choose another output path")
    return path


def _write_failure(path: Path, error: BaseException) -> OutputWriteError | None:
    """An error naming ``path`` when ``error`` means the disk could not take it (None for any other error).

    Writers report this differently: an ``OSError``, safetensors' ``(os error 28)``, torch's bare
    "unexpected pos"; a disk found full after the failure explains the last kind.
    """
    if isinstance(error, OutputWriteError):
        return OutputWriteError(path, error.reason)
    code = error.errno if isinstance(error, OSError) else None
    if code is None and (match := re.search(r"\(os error (\d+)\)", str(error))):
        code = int(match[1])
    if code in _WRITE_FAILURES:
        return OutputWriteError(path, os.strerror(code).lower())
    if isinstance(error, Exception) and _disk_full(path):
        return OutputWriteError(path, "no space left on device")
    return None


def check_output_dir(path: str | Path, overwrite: bool = False) -> Path:
    """Check, before any work starts, that a result may be written to ``path``.

    A missing ``path`` is fine. An existing one is refused unless ``overwrite`` is set, and even
    then unless it is an earlier output of this library (see the module docstring). Stages that a
    killed run of this output left behind are cleaned up first (:func:`remove_stale_stages`).
    """
    if path is None or not str(path).strip():
        raise ValueError(f"The output directory is not set (it is {path!r}, e.g. `output_dir: ~` in a YAML file): give a directory to write to")
    path = Path(path)
    remove_stale_stages(path)
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise FileExistsError(
                f"{path} already exists; choose another output directory, or set overwrite (--overwrite true; "
                "--model.overwrite true for ipg attribute) to replace an earlier ipg_lightning output there"
            )
        _check_replaceable(path)
    return check_writable(path)


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


def _stage_name(name: str) -> re.Pattern[str]:
    """The exact names of ``name``'s stages: ``.{name}.{host}-{pid}.{random}.partial`` (or ``.replaced``)."""
    return re.compile(rf"\.{re.escape(name)}\.[^./]+-\d+\.[a-z0-9_]+(?P<suffix>\.partial|\.replaced)")


def _new_stage(path: Path, suffix: str) -> Path:
    """A locked-to-be, marked staging directory beside ``path`` (see the module docstring)."""
    stage = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{_stage_tag()}.", suffix=suffix))
    (stage / STAGE_MARKER).write_text(json.dumps({"written_by": "ipg_lightning", "output": path.name}) + "\n", encoding="utf-8")
    return stage


def _marks(stage: Path, path: Path) -> bool:
    """Whether ``stage`` carries this library's marker naming ``path`` as its output."""
    try:
        marker = json.loads((stage / STAGE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("written_by") == "ipg_lightning" and marker.get("output") == path.name


def remove_stale_stages(path: str | Path) -> list[Path]:
    """Clean up after a run of this output that was killed while writing it.

    Its staging directory (an unfinished result) is removed. If it was killed while swapping an old
    result for a new one, so that ``path`` is missing, the old result is first put back. Only a stage
    that provably is this output's (its exact name and a marker naming the output inside) and that no
    live process holds is touched; a look-alike without a marker is named in a warning and left alone.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern, removed = _stage_name(path.name), []
    for stage in sorted(path.parent.iterdir()):
        match = pattern.fullmatch(stage.name)
        if match is None or stage.is_symlink() or not stage.is_dir() or not _abandoned(stage):
            continue
        if not _marks(stage, path):
            log.warning(
                "left %s in place: it is named like a stage of %s but carries no %s; delete it yourself if it is not needed",
                stage,
                path,
                STAGE_MARKER,
            )
            continue
        displaced = stage / path.name
        if match["suffix"] == ".replaced" and displaced.is_dir() and not path.exists():
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
    staging = _new_stage(path, ".partial")
    try:
        with _held(staging):
            yield staging
            _write_manifest(staging, kind)
            _make_readable(staging)
            check_output_dir(path, overwrite)  # the target may have changed while the work ran
            (staging / STAGE_MARKER).unlink()
            if not path.exists():
                os.replace(staging, path)
                return
            replaced = _new_stage(path, ".replaced")
            with _held(replaced):
                os.replace(path, replaced / path.name)
                os.replace(staging, path)
            shutil.rmtree(replaced, ignore_errors=True)
    except BaseException as error:
        failure = _write_failure(path, error)  # before the stage's space is freed
        shutil.rmtree(staging, ignore_errors=True)
        if failure is not None:
            raise failure from None
        raise
