"""Writing outputs without losing anything: build beside, rename into place, replace only our own.

* A bundle (fp32 or precision) is built in a temporary sibling `.NAME.partial-PID-XXXX` that
  holds a marker file from its first moment, then renamed into place. An existing output is
  replaced only with `overwrite` and only if this tool demonstrably wrote it: a bundle whose
  manifest is of our format (or an empty folder). Anything else is refused with one line.
* Folders this tool adds files to (demo output, engines) carry an owner file; a folder without it
  that holds anything else is refused. Their files are each written atomically.
* The old output is moved aside (`.NAME.old-PID-XXXX`) only for the instant of the swap and put
  back if the swap fails; temporaries are removed on every failure, a full disk included.
* Leftovers of a killed earlier run are removed when they carry our marker and their process is gone.
* A file output (embeddings) is written to a temporary sibling and renamed into place.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from bridge_export.runtime.manifest import FORMAT, MANIFEST

from bridge_export.exporter.errors import ExportError

log = logging.getLogger(__name__)

PARTIAL_MARKER = ".bridge-export-partial"  # inside a directory being built (never in a finished one)
OWNER_FILE = ".bridge-export-output"  # inside a finished non-bundle folder this tool wrote (demo, engines)


class OutputError(ExportError):
    """An output that cannot or must not be written; the message says what to do."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _usual_mode(path: Path, directory: bool) -> None:
    """Give a temporary (created private by tempfile) the mode a plain mkdir/open would have given it."""
    path.chmod((0o777 if directory else 0o666) & ~_umask())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def ours(path: Path) -> bool:
    """True if `path` may be replaced as a whole: a bundle of our format, our partial output, or an empty folder.

    Folders this tool only adds files to (demo, engines) carry an owner file instead, and are never
    replaced as a whole: a user may have put files of their own there since.
    """
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return False
    if (path / PARTIAL_MARKER).is_file():
        return True
    if not any(path.iterdir()):  # an empty folder: nothing to lose
        return True
    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_output_dir(out, overwrite: bool, flag: str = "--out") -> Path:
    """Refuse, before any work starts, an output folder that exists (unless ours and `overwrite`) or cannot be made."""
    out = Path(out).absolute()
    if out.is_symlink():
        raise OutputError(f"{flag} {out} is a symbolic link: give the real path (links are never replaced)")
    if out.exists():
        if not out.is_dir():
            raise OutputError(f"{flag} {out} is a file, not something bridge-export wrote: choose another {flag}")
        if not overwrite:
            raise OutputError(f"{out} already exists: choose another {flag} or pass --overwrite")
        if not ours(out):
            raise OutputError(f"{out} exists and was not written by bridge-export (no bundle manifest of our format): "
                              f"refusing to replace it; choose another {flag}")
    _check_parent(out, flag)
    return out


def _check_parent(out: Path, flag: str) -> None:
    parent = out.parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{flag} {out}: {existing} is a file, not a folder; choose another {flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {out}: {existing} is not writable; choose a writable {flag}")


def clean_stale(out: Path) -> None:
    """Remove `.NAME.partial-PID-*` / `.NAME.old-PID-*` siblings of a killed run: only ours, only if PID is gone."""
    out = Path(out).absolute()
    if not out.parent.is_dir():
        return
    for p in out.parent.glob(f".{out.name}.*-*"):
        kind, _, rest = p.name[len(out.name) + 2:].partition("-")
        if kind not in ("partial", "old") or not rest.split("-")[0].isdigit():
            continue
        if _alive(int(rest.split("-")[0])) or not ours(p):
            continue
        log.info("removing %s, left by an earlier run that did not finish", p)
        shutil.rmtree(p, ignore_errors=True)


def prepare_output(out, overwrite: bool) -> Path:
    """Check `out` may be written and return a fresh temporary sibling (already marked as ours) to build into."""
    out = check_output_dir(out, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {out.parent}: {e.strerror}; choose a writable --out") from e
    clean_stale(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    except OSError as e:
        raise OutputError(f"cannot write in {out.parent}: {e.strerror}; choose a writable --out") from e
    try:
        _usual_mode(tmp, directory=True)
        (tmp / PARTIAL_MARKER).write_text("a bridge-export output being written; safe to delete\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def discard(tmp: Path) -> None:
    """Remove a temporary output after a failure (never raises)."""
    shutil.rmtree(tmp, ignore_errors=True)


def commit_output(tmp: Path, out) -> None:
    """Rename the finished temporary directory into place, replacing an old output of ours last.

    If the swap fails, the old output is put back and the error re-raised; nothing is left beside it.
    """
    out = Path(out).absolute()
    (tmp / PARTIAL_MARKER).unlink(missing_ok=True)
    if not out.exists():
        tmp.rename(out)
        return
    if not ours(out):  # it changed since prepare_output checked it
        raise OutputError(f"{out} appeared while writing and was not written by bridge-export: refusing to replace it")
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
    old.rmdir()  # a unique name for the old output to move to
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)  # put the previous output back
        raise
    shutil.rmtree(old, ignore_errors=True)
    if old.exists():
        log.warning("could not remove the previous output moved to %s; delete it by hand", old)


def owned_folder(out, owner: str, flag: str = "--out", legacy=None) -> Path:
    """A folder this tool adds files to (engines): created and marked as ours, or refused if someone else's.

    `legacy(path) -> bool` may accept a folder an earlier version wrote before owner files existed.
    """
    out = Path(out).absolute()
    if out.is_symlink() and not out.is_dir():
        raise OutputError(f"{flag} {out} is a dangling symbolic link: give a real folder")
    if out.exists():
        if not out.is_dir():
            raise OutputError(f"{flag} {out} is a file: give a folder")
        if (out / MANIFEST).is_file():
            raise OutputError(f"{out} is a bundle: write {owner} to a folder of its own (e.g. {out / owner})")
        empty = not any(out.iterdir())
        if not ((out / OWNER_FILE).is_file() or empty or (legacy and legacy(out))):
            raise OutputError(f"{out} holds files bridge-export did not write: refusing to write {owner} into it; "
                              f"choose another {flag}")
    else:
        _check_parent(out, flag)
        out.mkdir(parents=True)
    if not (out / OWNER_FILE).is_file():
        (out / OWNER_FILE).write_text(json.dumps({"written_by": "bridge-export", "kind": owner}) + "\n")
    return out


@contextmanager
def output_dir(out, overwrite: bool) -> Iterator[Path]:
    """`with output_dir(out, overwrite) as tmp:` build into tmp; success replaces `out`, failure removes tmp."""
    tmp = prepare_output(out, overwrite)
    try:
        yield tmp
        commit_output(tmp, out)
    except BaseException:
        discard(tmp)
        raise


def check_output_file(out, overwrite: bool, suffixes: tuple[str, ...], flag: str = "--out") -> Path:
    """Refuse, before any work, a file output with a wrong suffix, in an unwritable place, or existing (no --overwrite)."""
    out = Path(out).absolute()
    if out.suffix.lower() not in suffixes:
        raise OutputError(f"{flag} {out.name}: the file must end in {' or '.join(suffixes)} (its format)")
    if out.is_symlink() or (out.exists() and not out.is_file()):
        raise OutputError(f"{flag} {out} exists and is not a regular file: choose another {flag}")
    if out.exists() and not overwrite:
        raise OutputError(f"{out} already exists: choose another {flag} or pass --overwrite")
    _check_parent(out, flag)
    return out


@contextmanager
def atomic_file(out) -> Iterator[Path]:
    """`with atomic_file(out) as tmp:` write tmp; on success it replaces `out`, on failure it is removed."""
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.partial-{os.getpid()}-", suffix=out.suffix, dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        _usual_mode(tmp, directory=False)
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
