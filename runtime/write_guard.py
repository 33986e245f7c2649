"""Who is writing an output: one writer per output path, and leftovers removed only when provably abandoned.

Every temporary a writer leaves beside its output (`.NAME.partial-PID-HOST-XXXX`, `.NAME.old-...`)
and the lock it holds while writing (`.NAME.bridge-export-lock`) carry the writer's PID *and* a
host key: a hash of the host name, the kernel's boot id and the PID namespace. A PID is only
meaningful on the same boot of the same host in the same container, so a leftover is removed
only when its host key is ours and its PID is gone. On shared storage (NFS, a volume mounted in
several containers) a leftover of another host or container is left alone and named, never
guessed about.

The lock is a file created with O_CREAT | O_EXCL (atomic on local filesystems and NFSv3+), not
flock(), which NFS may not honour.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import time
from functools import lru_cache
from pathlib import Path

from bridge_export.runtime.errors import UserError

LOCK_SUFFIX = ".bridge-export-lock"


class OutputBusy(UserError, RuntimeError):
    """Another run is writing the same output (or left its lock where its end cannot be proven)."""


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


@lru_cache(maxsize=1)
def host_key() -> str:
    """12 hex digits naming this host, boot and PID namespace: where a PID of ours means something."""
    try:
        pidns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        pidns = ""
    ident = "|".join([socket.gethostname(), _read("/proc/sys/kernel/random/boot_id"), pidns])
    return hashlib.sha256(ident.encode()).hexdigest()[:12]


def alive(pid: int) -> bool:
    """True if a process `pid` exists in this PID namespace."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def provably_gone(pid: int, key: str) -> bool:
    """True only when the owner ran here (same host key) and its process no longer exists."""
    return key == host_key() and not alive(pid)


def temp_prefix(out: Path, kind: str) -> str:
    """Name prefix of a temporary beside `out`: `.NAME.KIND-PID-HOSTKEY-`."""
    return f".{Path(out).name}.{kind}-{os.getpid()}-{host_key()}-"


def parse_temp(out: Path, entry: str) -> tuple[str, int, str] | None:
    """(kind, pid, host key) of a temporary named by temp_prefix for `out`, else None."""
    head = f".{Path(out).name}."
    if not entry.startswith(head):
        return None
    parts = entry[len(head):].split("-")
    if len(parts) < 4 or parts[0] not in ("partial", "old") or not parts[1].isdigit() or len(parts[2]) != 12:
        return None
    return parts[0], int(parts[1]), parts[2]


def abandoned(out: Path) -> list[Path]:
    """Temporaries beside `out` (files or folders) whose writer is provably gone."""
    out = Path(out).absolute()
    if not out.parent.is_dir():
        return []
    found = []
    for p in out.parent.glob(f".{out.name}.*-*"):
        info = parse_temp(out, p.name)
        if info and not p.is_symlink() and provably_gone(info[1], info[2]):
            found.append(p)
    return found


def lock_path(out: Path) -> Path:
    """The lock file of output `out`."""
    out = Path(out).absolute()
    return out.with_name(f".{out.name}{LOCK_SUFFIX}")


class OutputLock:
    """Held while one run writes `out`: a second run refuses, naming the holder.

    A lock whose holder is provably gone (same host key, PID no longer running) is taken over; one
    from another host or container is reported with its holder, to be removed by hand if that run
    is known to be over.
    """

    def __init__(self, out):
        self.out = Path(out).absolute()
        self.path = lock_path(self.out)
        self.held = False

    def acquire(self) -> "OutputLock":
        """Create the lock file atomically, taking over one whose holder is provably gone; else OutputBusy."""
        record = json.dumps({"pid": os.getpid(), "host_key": host_key(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder and provably_gone(holder.get("pid", -1), holder.get("host_key", "")):
                    self.path.unlink(missing_ok=True)  # its writer died (killed, out of memory): take over
                    continue
                who = (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}"
                       if holder else "an unreadable lock")
                raise OutputBusy(f"another bridge-export run ({who}) is writing {self.out}: wait for it to finish, "
                                 f"or choose another --out; if that run is known to be over, delete {self.path}")
            except OSError as e:
                if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
                    raise OutputBusy(f"cannot write in {self.out.parent}: {e.strerror}; choose a writable --out") from e
                raise
            with os.fdopen(fd, "w") as f:
                f.write(record + "\n")
            self.held = True
            return self
        raise OutputBusy(f"could not take the lock {self.path}: another run keeps taking it; retry")

    def _holder(self) -> dict | None:
        try:
            d = json.loads(self.path.read_text())
            return d if isinstance(d, dict) else None
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        """Remove the lock if this run holds it (idempotent)."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


__all__ = ["OutputBusy", "OutputLock", "host_key", "alive", "provably_gone", "temp_prefix", "parse_temp",
           "abandoned", "lock_path", "LOCK_SUFFIX"]
