"""``send --wait``'s progress: the command looked up in the idempotency store every few
seconds, as ``command-relay result`` does, and a line said whenever its stage changes
(claimed by which replica, sent, collecting a 202, waiting for a delayed retry).

The lookups run on a thread of their own, so a slow store never delays the waiting
connection's heartbeats; a store that does not answer ends the progress (said once),
never the waiting.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable
from types import TracebackType

from worker.admin.results import Lookup, look_up
from worker.errors import StoreUnavailable
from worker.idempotency import IdempotencyStore

PROGRESS_EVERY_S = 2.0  # how often the store is asked: cheap (two reads), and fresh enough
STOP_WAIT_S = 6.0  # how long closing waits for a lookup under way (a Redis timeout is 5 s)


class ProgressWatch:
    """While open, looks ``tenant``'s command ``command_id`` up every ``every_s`` in the
    store ``open_store`` opens, and calls ``say`` with a line when its stage changes."""

    def __init__(
        self,
        open_store: Callable[[], IdempotencyStore],
        command_id: str,
        say: Callable[[str], None],
        every_s: float = PROGRESS_EVERY_S,
        tenant: str = "default",
    ) -> None:
        self._open_store = open_store
        self._command_id = command_id
        self._tenant = tenant
        self._say = say
        self._every_s = every_s
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="progress", daemon=True)

    def __enter__(self) -> ProgressWatch:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop looking; no line is said after this returns (but for a lookup stuck
        past STOP_WAIT_S, whose line is then dropped)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(STOP_WAIT_S)

    def _watch(self) -> None:
        with asyncio.Runner() as runner:
            try:
                store = self._open_store()
            except (ValueError, OSError, sqlite3.Error) as error:
                # Its message may quote the URL, credentials and all: named by type only.
                self._said(f"no progress: the idempotency store can not be opened "
                           f"({type(error).__name__}); check RELAY_IDEMPOTENCY_URL")
                return
            try:
                self._follow(runner, store)
            finally:
                runner.run(store.close())

    def _follow(self, runner: asyncio.Runner, store: IdempotencyStore) -> None:
        stage: tuple[object, ...] | None = None
        while not self._stop.wait(0 if stage is None else self._every_s):
            try:
                found: Lookup = runner.run(
                    look_up(store, self._command_id, tenant=self._tenant)
                )
            except StoreUnavailable as error:
                self._said(f"no progress: the idempotency store does not answer ({error}); "
                           "still waiting for the result")
                return
            if found.stage() != stage:
                stage = found.stage()
                line = found.progress()
                if line is not None:
                    self._said(line)

    def _said(self, line: str) -> None:
        if not self._stop.is_set():
            elapsed_s = time.monotonic() - self._started
            self._say(f"[+{elapsed_s:.0f}s] {line}")
