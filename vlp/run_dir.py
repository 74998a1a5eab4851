"""The run folder (``output_dir``): its lock, so one live training writes it at a time, and the check that it
takes files, made before any work."""
from __future__ import annotations

import errno
import os
import re
import weakref
from pathlib import Path

from vlp.strict import ConfigError

LOCK_FILE = ".vlp-run.lock"


class RunDirBusy(RuntimeError):
    """Another live process trains into this output_dir."""


# run-dir locks this process holds, by lock file path (weakly: a lock dropped unclosed closes its file, as before)
_HELD: "weakref.WeakValueDictionary[str, RunLock]" = weakref.WeakValueDictionary()


class RunLock:
    """An exclusive POSIX record lock (``fcntl.lockf``) on ``RUN_DIR/.vlp-run.lock``. A record lock belongs to the
    process: forked DataLoader workers do not hold it, and the OS drops it the moment the process dies."""

    def __init__(self, key: str, file):
        self.key, self.file = key, file

    def close(self) -> None:
        if self.file is not None:
            _HELD.pop(self.key, None)
            self.file.close()
            self.file = None


def lock_run_dir(run_dir: str | os.PathLike) -> RunLock:
    """Take the run folder's lock for this process (released by :meth:`RunLock.close` or by the process's death, so a
    killed run never leaves a stale lock). Raises :class:`RunDirBusy` at once if another process, or this one,
    holds it: two runs writing one folder would mix checkpoints and metrics."""
    import fcntl

    path = Path(run_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    key = str(path.resolve())
    if key in _HELD:  # this process: opening the file again and closing it would drop the process's record lock
        raise _busy(run_dir, f"pid {os.getpid()} on {os.uname().nodename}")
    f = open(path, "a+")
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EACCES, errno.EAGAIN):  # not "held by another process" (e.g. no locks on NFS)
            f.close()
            raise
        f.seek(0)
        holder = f.read().strip()
        f.close()
        raise _busy(run_dir, holder) from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
    f.flush()
    _HELD[key] = lock = RunLock(key, f)
    return lock


def _busy(run_dir, holder: str) -> RunDirBusy:
    """The busy error, saying whether the pid named in the lock file is alive (when it ran on this host)."""
    m = re.match(r"pid (\d+) on (\S+)", holder)
    if m and m.group(2) == os.uname().nodename:
        try:
            os.kill(int(m.group(1)), 0)
            holder += ", alive"
        except ProcessLookupError:
            holder += ", no longer running: a process it started may hold the lock"
        except PermissionError:
            holder += ", alive"
    return RunDirBusy(f"output_dir: {run_dir} is in use by a running training ({holder or 'another process'}); "
                      f"wait for it, or pick another output_dir")


def check_writable(run_dir: Path) -> None:
    """output_dir must take files (checked before any work, not at the first checkpoint)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".vlp-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"output_dir: {run_dir} is not writable ({err.strerror or err})") from None
