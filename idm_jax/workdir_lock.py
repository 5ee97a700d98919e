"""One run per workdir: workdir.lock.

`locked` holds workdir.lock (an OS advisory lock, fcntl.flock, on a file naming the holder's
host, pid and start time) for as long as a run writes there. A second process stops with one
line naming the holder (WorkdirBusyError); a lock whose process is gone (kill -9, a reboot: the
OS dropped the flock) is taken over with a warning. On filesystems without flock the lock file's
creation is the lock. Several processes of one multi-host run share the lock of process 0.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

from absl import logging

from idm_jax.workdir import WorkdirError, is_disk_full, no_space

LOCK = "workdir.lock"


class WorkdirBusyError(WorkdirError):
    """Another process holds the workdir's lock."""


# flock answers these on filesystems that do not support it (some NFS, FUSE mounts).
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL)


@dataclasses.dataclass
class _Held:
    fd: int  # the open lock file; with flock, closing it releases the lock
    holder: dict[str, Any]
    flock: bool  # False: the file's existence is the lock (no flock on this filesystem)
    depth: int = 1  # nested holds in this process (main.py, then run_condensation)


_HELD: dict[str, _Held] = {}  # the workdirs this process holds, by absolute path


def boot_id() -> str:
    """This boot of this machine (Linux), so a pid of an earlier boot is never taken for alive."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _holder() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "boot_id": boot_id(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:160]}


def describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process (its lock file names none)"
    text = f"process {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
    return text + (f" ({holder['command']})" if holder.get("command") else "")


def read_holder(workdir: str) -> dict[str, Any] | None:
    """What workdir.lock says about its holder, or None (no file, empty or unreadable)."""
    try:
        with open(os.path.join(workdir, LOCK)) as f:
            holder = json.loads(f.read() or "null")
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _busy(workdir: str, holder: dict[str, Any] | None, hint: str = "") -> WorkdirBusyError:
    return WorkdirBusyError(f"workdir {workdir} is in use by {describe(holder)}{hint}; wait for that run to "
                            "end (or stop it), or use another --workdir")


def _gone(holder: dict[str, Any]) -> bool:
    """Whether the holder's process surely no longer runs (only knowable on this machine)."""
    if holder.get("host") != socket.gethostname():
        return False
    if holder.get("boot_id") and holder.get("boot_id") != boot_id():
        return True  # the machine restarted since
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, TypeError, ValueError):
        return False
    return False


def _flock_works(folder: str) -> bool:
    fd, probe = tempfile.mkstemp(dir=folder, prefix=".lock-probe-")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in _NO_FLOCK:
            return False
        raise
    finally:
        os.close(fd)
        os.unlink(probe)


def _write_holder(fd: int, holder: dict[str, Any], path: str) -> None:
    """Writes the holder record into the lock file this process holds; on a full disk the lock is
    dropped (fd closed, file removed) and NoSpaceError names the file."""
    data = (json.dumps(holder) + "\n").encode()
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    except OSError as e:
        if not is_disk_full(e):
            raise
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise no_space(f"the lock file {LOCK}", path, len(data), kept="nothing else was written") from None


def _took_over(workdir: str, stale: dict[str, Any] | None) -> None:
    logging.warning("workdir %s: took over the lock left by %s, which is gone (killed, or the machine "
                    "restarted)", workdir, describe(stale))


def _lock_with_flock(workdir: str, path: str, holder: dict[str, Any]) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _busy(workdir, read_holder(workdir)) from None
        # The holder may have released (and deleted) the file between our open and flock:
        # then we hold a lock on a deleted file, and try again on the one now at `path`.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        stale = os.pread(fd, 4096, 0)
        if stale.strip():  # a holder ended without releasing: the OS dropped its flock
            try:
                _took_over(workdir, json.loads(stale))
            except ValueError:
                _took_over(workdir, None)
        _write_holder(fd, holder, path)
        return fd


def _lock_with_file(workdir: str, path: str, holder: dict[str, Any]) -> int:
    """Without flock: the lock file's creation (O_EXCL) is the lock; a holder whose pid is gone
    on this machine is stale."""
    for _ in range(3):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            stale = read_holder(workdir)
            if stale is None or not _gone(stale):
                raise _busy(workdir, stale, f" (no flock on this filesystem: if that process is gone, delete {path})"
                            ) from None
            _took_over(workdir, stale)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            continue
        _write_holder(fd, holder, path)
        return fd
    raise _busy(workdir, read_holder(workdir))


def acquire_lock(workdir: str) -> dict[str, Any]:
    """Takes workdir.lock for this process (again, if it holds it already); returns the holder record.

    Raises WorkdirBusyError (one line naming the holder) when another process holds it; a lock
    whose process is gone is taken over with a warning. Writes nothing else.
    """
    workdir = os.path.abspath(workdir)
    held = _HELD.get(workdir)
    if held is not None:
        held.depth += 1
        return held.holder
    path, holder = os.path.join(workdir, LOCK), _holder()
    use_flock = _flock_works(workdir)
    fd = (_lock_with_flock if use_flock else _lock_with_file)(workdir, path, holder)
    _HELD[workdir] = _Held(fd, holder, use_flock)
    return holder


def release_lock(workdir: str) -> None:
    """Undoes one acquire_lock; the last one deletes workdir.lock and drops the lock."""
    workdir = os.path.abspath(workdir)
    held = _HELD.get(workdir)
    if held is None:
        return
    held.depth -= 1
    if held.depth:
        return
    del _HELD[workdir]
    path = os.path.join(workdir, LOCK)
    try:  # delete first, then unlock: a waiting process then finds no file, or its own
        if os.path.samestat(os.fstat(held.fd), os.stat(path)):
            os.unlink(path)
    except FileNotFoundError:
        pass
    finally:
        os.close(held.fd)


@contextlib.contextmanager
def locked(workdir: str) -> Iterator[dict[str, Any]]:
    """Holds workdir.lock while the block runs; yields the holder record.

    Several processes of one multi-host run share the workdir by design: process 0 takes the
    lock and every other one checks that the lock file names process 0 of its own run (so the
    folder is one shared folder, and no other run holds it). All processes raise together.
    """
    import jax  # pylint: disable=g-import-not-at-top  (workdir_lock.py stays importable without JAX)
    from idm_jax import distributed  # pylint: disable=g-import-not-at-top
    if not distributed.multi_process():
        holder = acquire_lock(workdir)
        try:
            yield holder
        finally:
            release_lock(workdir)
        return
    problem, holder = None, None
    if distributed.is_main():
        try:
            holder = acquire_lock(workdir)
        except WorkdirError as e:
            problem = str(e)
    problem, holder = distributed.gather_objects([problem, holder])[0]
    if problem is None and not distributed.is_main() and read_holder(workdir) != holder:
        problem = (f"process {jax.process_index()} does not find process 0's lock in "
                   f"{os.path.join(os.path.abspath(workdir), LOCK)} (it names {describe(read_holder(workdir))}); "
                   "every process of a run needs the same workdir on a shared filesystem")
    problems = [p for p in distributed.gather_objects(problem) if p]
    if problems:
        if distributed.is_main() and holder is not None:
            release_lock(workdir)
        raise WorkdirBusyError(problems[0]) if "in use by" in problems[0] else WorkdirError(problems[0])
    try:
        yield holder
    finally:
        if distributed.is_main():
            release_lock(workdir)


def lock_until_exit(workdir: str) -> dict[str, Any]:
    """`locked(workdir)` entered now and left when the interpreter exits (main.py: every mode).

    An exception, Ctrl-C, sys.exit or a SIGTERM turned into SystemExit all end in atexit; a
    kill -9 leaves the file, which the next run takes over (the OS dropped the flock).
    """
    hold = locked(workdir)
    holder = hold.__enter__()  # pylint: disable=unnecessary-dunder-call
    atexit.register(hold.__exit__, None, None, None)
    return holder
