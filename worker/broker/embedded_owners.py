"""Who is alive among the connections to an embedded broker's file, so that the messages
a killed process had taken can be given back.

Each connection that takes messages holds an exclusive ``flock`` on a file of its own,
``<broker file>-owners/<owner>.lock``, for as long as it lives. The kernel drops the lock
when the process ends, however it ends (SIGKILL included), so a lock file that can be
locked belongs to a connection that is gone, and a missing one to a connection whose
file was cleared already. A lock file appears under its final name already locked
(made under a temporary name, locked, then renamed), so a connection being born never
looks dead.

Without ``fcntl`` (Windows) nothing is tracked, and a process killed keeps its messages
taken, as kombu's transport does.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

if sys.platform != "win32":
    import fcntl

LOCK_SUFFIX = ".lock"
DIRECTORY_SUFFIX = "-owners"
TRACKED = sys.platform != "win32"
OWNER = re.compile(r"[0-9a-f]{32}")  # what this module names owners (a path of nothing else)


class Owners:
    """The lock directory of one broker file, seen by one connection (``self.me``)."""

    def __init__(self, database: Path) -> None:
        self.me = uuid.uuid4().hex
        self._directory = database.with_name(database.name + DIRECTORY_SUFFIX)
        self._held: int | None = None  # the descriptor of our own lock file

    @classmethod
    def of(cls, database: Path | None) -> Owners | None:
        """The owners of ``database``'s file; None when liveness can not be told (no
        file: an in-memory database; no ``fcntl``)."""
        return cls(database) if database is not None and TRACKED else None

    def hold(self) -> None:
        """Take this connection's lock (once)."""
        if self._held is not None:
            return
        self._directory.mkdir(parents=True, exist_ok=True)
        temporary = self._directory / f".{self.me}.tmp"
        descriptor = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            temporary.rename(self._lock_file(self.me))
        except BaseException:
            os.close(descriptor)
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise
        self._held = descriptor

    def release(self) -> None:
        """Drop this connection's lock and its file (its messages are settled or back
        in their queues)."""
        if self._held is None:
            return
        with contextlib.suppress(OSError):
            self._lock_file(self.me).unlink()
        os.close(self._held)
        self._held = None

    def gone(self, known: set[str]) -> Iterator[str]:
        """Owners that are gone: those of ``known`` (seen holding messages) and those of
        the lock files, other than this connection. Each is locked while it is yielded
        (so it is handled once), then its lock file is removed."""
        on_disk = set()
        with contextlib.suppress(FileNotFoundError):
            on_disk = {
                path.name.removesuffix(LOCK_SUFFIX)
                for path in self._directory.iterdir() if path.name.endswith(LOCK_SUFFIX)
            }
        for owner in sorted((known | on_disk) - {self.me}):
            if not OWNER.fullmatch(owner):
                continue
            with self._if_gone(owner) as gone:
                if gone:
                    yield owner

    @contextlib.contextmanager
    def _if_gone(self, owner: str) -> Iterator[bool]:
        path = self._lock_file(owner)
        try:
            descriptor = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            yield True  # cleared already: its connection is gone
            return
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False  # held: alive
                return
            yield True
            with contextlib.suppress(OSError):
                path.unlink()
        finally:
            os.close(descriptor)

    def _lock_file(self, owner: str) -> Path:
        return self._directory / f"{owner}{LOCK_SUFFIX}"
