"""Run-folder safety for ``sigvlp train``: one run per folder, never a new run on top of an old
one, ``--resume`` only on a run folder.

- ``RunLock``: an exclusive ``fcntl.flock`` on ``OUT/.sigvlp-lock`` held for the run's life; the
  file names the holder (host, pid, start time). The kernel drops the flock when its holder
  exits, so a second run into the same folder is refused while the first lives. A lock file
  that still names a holder when the flock is free is stale: it is taken over (with a log line)
  only when that holder was on this host and is no longer running; a holder on another machine
  (a shared file system, where flock may not reach) is never taken over.
- ``check_run_folder``: before anything is written, a folder holding checkpoints (any
  ``checkpoints/step_*``) or logged steps is refused without --resume, and --resume is refused
  on a folder that is not a run (no config.yaml, no checkpoint), naming what is there.
- ``Footprint``: what a run start creates in the run folder (the folders it makes, its lock file
  and log.txt); ``undo()`` removes exactly that when the start fails before the run was set up,
  so a bad --data or --init-from leaves the disk as it was.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Optional

__all__ = ["Footprint", "LOCK_NAME", "RunLock", "check_run_folder"]

LOCK_NAME = ".sigvlp-lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _holder(text: str) -> Optional[tuple[str, int, str]]:
    """(host, pid, since) from a lock file's 'host=H pid=P since=T' line, or None."""
    fields = dict(part.split("=", 1) for part in text.split() if "=" in part)
    try:
        return fields["host"], int(fields["pid"]), fields.get("since", "?")
    except (KeyError, ValueError):
        return None


class RunLock:
    """Exclusive lock of a run folder (see the module docstring). ``acquire()`` returns a line
    to log when it took over a stale lock (else None) and raises FileExistsError (one line,
    naming the holder and the ways forward) when the folder is in use; ``release()`` empties the
    file and drops the lock."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._file = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> Optional[str]:
        f = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            who = f.read().strip() or "holder unknown"
            f.close()
            raise FileExistsError(f"out: {self.folder} is in use by another run ({who}); wait for it to end or "
                                  f"choose another --out") from None
        f.seek(0)
        note = self._stale(_holder(f.read()), f)
        f.seek(0)
        f.truncate()
        f.write(f"host={socket.gethostname()} pid={os.getpid()} since={time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
        f.flush()
        self._file = f
        return note

    def _stale(self, holder, f) -> Optional[str]:
        if holder is None or holder[:2] == (socket.gethostname(), os.getpid()):
            return None
        host, pid, since = holder
        if host != socket.gethostname():
            f.close()
            raise FileExistsError(f"out: {self.folder} is locked by pid {pid} on host {host} (since {since}), which "
                                  f"this host cannot check; if that run has ended, delete {self.path}, or choose "
                                  f"another --out")
        if _alive(pid):
            f.close()
            raise FileExistsError(f"out: {self.folder} is locked by pid {pid} on this host (since {since}), which "
                                  f"is still running; wait for it to end or choose another --out")
        return f"run folder lock: took over the stale lock of pid {pid} on {host} (since {since}; not running)"

    def release(self) -> None:
        if self._file is None:
            return
        f, self._file = self._file, None
        try:
            f.seek(0)
            f.truncate()
            f.flush()
            fcntl.flock(f, fcntl.LOCK_UN)
        finally:
            f.close()


class Footprint:
    """Notes, before anything is written, which of `folder` and its ancestors are absent and
    which of its own files (the lock file, log.txt) are absent; ``undo()`` removes those files
    and then those folders, deepest first, each only while empty (os.rmdir), so nothing this
    invocation did not create is ever removed."""

    FILES = (LOCK_NAME, "log.txt")

    def __init__(self, folder):
        folder = Path(folder)
        self.folders = []
        probe = folder
        while not probe.exists() and probe.parent != probe:
            self.folders.append(probe)
            probe = probe.parent
        self.files = [folder / name for name in self.FILES if not (folder / name).exists()]

    def undo(self) -> None:
        for path in self.files:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        for path in self.folders:
            try:
                path.rmdir()
            except OSError:  # not empty (something else was written there) or gone: keep it
                break


def _listing(folder: Path, limit: int = 6) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if p.name != LOCK_NAME)
    if not names:
        return "nothing"
    return ", ".join(names[:limit]) + (f", ... ({len(names)} entries)" if len(names) > limit else "")


def check_run_folder(out, resume: bool) -> None:
    """Refuse, before anything is written: without resume, a folder holding checkpoints
    (checkpoints/step_*, complete or not) or logged steps (a non-empty metrics.jsonl)
    (FileExistsError); with resume, a folder that is not a run: absent, or without config.yaml and
    without a checkpoint (FileNotFoundError). Messages name what is there and the ways forward."""
    out = Path(out)
    steps = sorted(p.name for p in (out / "checkpoints").glob("step_*")) if (out / "checkpoints").is_dir() else []
    metrics = out / "metrics.jsonl"
    logged = metrics.is_file() and metrics.stat().st_size > 0
    if not resume:
        if steps or logged:
            what = (f"checkpoints {', '.join(steps[-3:])}" + (f" and {len(steps) - 3} more" if len(steps) > 3 else "")
                    if steps else "no checkpoint") + (", metrics.jsonl with logged steps" if logged else "")
            raise FileExistsError(f"out: {out} already holds a run ({what}); pass --resume to continue it, or "
                                  f"choose another --out for a new run")
        return
    if not out.is_dir():
        raise FileNotFoundError(f"--resume: no run folder {out} (nothing there); drop --resume to start a new run, "
                                f"or give the run's folder as --out")
    if not (out / "config.yaml").is_file() and not steps:
        raise FileNotFoundError(f"--resume: {out} is not a run folder (no config.yaml, no checkpoints/step_*; it "
                                f"holds {_listing(out)}); give the run's folder as --out, or drop --resume to start "
                                f"a new run")
