"""Advisory file locks that say who holds them: one run per workdir, one build per dataset.

A lock is an `fcntl.flock` on a small file that records its holder (pid, host, start time, what
it is doing); the holder removes the file when it releases the lock. The kernel releases the
lock when the holder dies, however it dies (SIGKILL included), so a lock file that is still
there but not locked was left by a dead process: the next process takes it over and says so
in one line. A live holder's record stays readable: the file is never truncated before the
lock is held (which is why this is not `filelock`, whose lock files are truncated by every
process that tries them).

  with FileLock(path, purpose="training run", wait=False):   # raises LockedError if held
    ...
  with FileLock(path, purpose="dataset build", wait=True):   # waits, saying once for whom
    ...

Locks are local-filesystem locks: a path on an object store (gs://, s3://) is not locked.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time

from dmf_jax.core.errors import UserError


class LockedError(UserError):
  """The lock is held by another live process."""


def _describe(holder: dict) -> str:
  started = holder.get("started")
  when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
  return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
          f"({holder.get('purpose', '?')}, since {when})")


def is_local(path: os.PathLike | str) -> bool:
  return "://" not in os.fspath(path)


class FileLock:
  """An exclusive lock on `path` (created if missing), with its holder recorded inside."""

  def __init__(self, path: os.PathLike | str, *, purpose: str, wait: bool = False,
               log=None):
    self.path = os.fspath(path)
    self.purpose = purpose
    self.wait = wait
    self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    self._fd = None

  def holder(self) -> dict:
    """The record in the lock file ({} when empty or unreadable)."""
    try:
      with open(self.path) as f:
        return json.loads(f.read() or "{}")
    except (OSError, ValueError):
      return {}

  def acquire(self) -> "FileLock":
    if not is_local(self.path):
      return self
    os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        held_by = _describe(self.holder())
        if not self.wait:
          os.close(fd)
          raise LockedError(f"{self.path} is locked by {held_by}") from None
        self.log(f"waiting for {self.path}: locked by {held_by}")
        fcntl.flock(fd, fcntl.LOCK_EX)
      # The holder we waited for removes the file as it releases: then this lock is on a
      # file nobody else will open, and the lock must be taken again on the path's new file.
      try:
        same = os.path.samestat(os.fstat(fd), os.stat(self.path))
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    previous = self.holder()
    if previous.get("pid") is not None:  # a record left by a holder that did not release it
      self.log(f"took over the stale lock {self.path} of {_describe(previous)}: that process "
                f"is no longer running")
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
              "purpose": self.purpose}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    os.fsync(fd)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      os.unlink(self.path)  # before unlocking: a waiter then retries on a new file
    except FileNotFoundError:
      pass
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None

  def __enter__(self) -> "FileLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
