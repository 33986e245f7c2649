"""Writing outputs without losing anything: build beside, rename into place, replace only our own.

* A bundle (fp32 or precision) is built in a temporary sibling `.NAME.partial-PID-XXXX` that
  holds a marker file from its first moment, then renamed into place. An existing output is
  replaced only with `overwrite` and only if this tool demonstrably wrote it: a bundle whose
  manifest is of our format (or an empty folder). Anything else is refused with one line.
* Folders this tool adds files to (demo output, engines) carry an owner file; a folder without it
  that holds anything else is refused. Their files are each written atomically.
* The old output is moved aside (`.NAME.old-PID-XXXX`) only for the instant of the swap and put
  back if the swap fails; temporaries are removed on every failure, a full disk included.
* Leftovers of a killed earlier run (folders and files) are removed when their name carries our
  PID-and-host pattern and their process is provably gone: same host, boot and PID namespace, PID
  no longer running (bridge_export.runtime.write_guard). Another host's or container's are kept.
* One writer per output: a lock file beside it (`.NAME.bridge-export-lock`) is held from the first
  temporary to the rename; a second run refuses, naming the holder.
* A bundle holding files its manifest does not list (a user's notes, an engines/ folder) is not
  ours to replace: `--overwrite` refuses it with the list.
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
from bridge_export.runtime.write_guard import OutputLock, abandoned, alive, temp_prefix

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


_alive = alive  # kept for callers of the old private name
_pending: dict[Path, tuple[OutputLock, bool]] = {}  # temporary folder -> (its output's lock, overwrite)


def foreign_entries(path: Path) -> list[str]:
    """Entries of a bundle folder its manifest does not list (nor manifest.json, nor our marker): not ours."""
    try:
        listed = json.loads((path / MANIFEST).read_text()).get("files") or {}
    except (OSError, ValueError, AttributeError):
        return sorted(p.name for p in path.iterdir())
    keep = {Path(k).parts[0] for k in listed if isinstance(k, str) and Path(k).parts} | {MANIFEST, PARTIAL_MARKER}
    return sorted(p.name for p in path.iterdir() if p.name not in keep)


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
    return _our_format(path) and not foreign_entries(path)


def _our_format(path: Path) -> bool:
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
            extra = foreign_entries(out) if _our_format(out) else []
            if extra:
                shown = ", ".join(extra[:8]) + (f" and {len(extra) - 8} more" if len(extra) > 8 else "")
                raise OutputError(f"{out} is a bundle that also holds files bridge-export did not write there "
                                  f"({shown}): --overwrite would delete them; move them out or choose another {flag}")
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
    """Remove `.NAME.partial-PID-HOST-*` / `.NAME.old-PID-HOST-*` siblings (folders or files) of a killed run:
    only names of our pattern, only when their process provably is gone (write_guard.provably_gone)."""
    for p in abandoned(out):
        if p.is_dir() and not ours(p):
            continue
        log.info("removing %s, left by an earlier run that did not finish", p)
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def prepare_output(out, overwrite: bool) -> Path:
    """Check `out` may be written and return a fresh temporary sibling (already marked as ours) to build into."""
    out = check_output_dir(out, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {out.parent}: {e.strerror}; choose a writable --out") from e
    lock = OutputLock(out).acquire()
    try:
        clean_stale(out)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out, "partial"), dir=out.parent))
        except OSError as e:
            raise OutputError(f"cannot write in {out.parent}: {e.strerror}; choose a writable --out") from e
        try:
            _usual_mode(tmp, directory=True)
            (tmp / PARTIAL_MARKER).write_text("a bridge-export output being written; safe to delete\n")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except BaseException:
        lock.release()
        raise
    _pending[tmp] = (lock, overwrite)
    return tmp


def _release(tmp: Path) -> None:
    lock, _ = _pending.pop(tmp, (None, None))
    if lock is not None:
        lock.release()


def discard(tmp: Path) -> None:
    """Remove a temporary output after a failure and release its output's lock (never raises)."""
    shutil.rmtree(tmp, ignore_errors=True)
    _release(tmp)


def commit_output(tmp: Path, out) -> None:
    """Rename the finished temporary directory into place, replacing an old output of ours last.

    If the swap fails, the old output is put back and the error re-raised; nothing is left beside it.
    """
    out = Path(out).absolute()
    _, overwrite = _pending.get(tmp, (None, True))
    if not out.exists():
        (tmp / PARTIAL_MARKER).unlink(missing_ok=True)
        tmp.rename(out)
        _release(tmp)
        return
    if not overwrite:  # it appeared while this run wrote (another writer without the lock, or by hand)
        raise OutputError(f"{out} appeared while writing: refusing to replace it without --overwrite")
    if not ours(out):  # it changed since prepare_output checked it
        raise OutputError(f"{out} appeared while writing and was not written by bridge-export: refusing to replace it")
    (tmp / PARTIAL_MARKER).unlink(missing_ok=True)
    old = Path(tempfile.mkdtemp(prefix=temp_prefix(out, "old"), dir=out.parent))
    old.rmdir()  # a unique name for the old output to move to
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)  # put the previous output back
        raise
    _release(tmp)
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
    with OutputLock(out):
        clean_stale(out)
        fd, name = tempfile.mkstemp(prefix=temp_prefix(out, "partial"), suffix=out.suffix, dir=out.parent)
        os.close(fd)
        tmp = Path(name)
        try:
            _usual_mode(tmp, directory=False)
            yield tmp
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
