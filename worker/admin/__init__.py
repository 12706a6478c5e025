"""The operators' toolkit behind the command line: the configuration check and the run
summary (``config.py``), probes of the broker, stores and vendor accounts (``probe.py``),
results read from the idempotency store (``results.py``), the dead-letter queue
(``deadletters.py``), and the errors of a broker or store an operator can fix
(``mistakes.py``). Errors an operator can fix are :class:`UserError`: the command line
prints them in a line or two, without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the operator can fix: what is wrong, then what to do about it."""

    def __init__(self, problem: str, fix: str = "") -> None:
        super().__init__(f"{problem}: {fix}" if fix else problem)
        self.problem = problem
        self.fix = fix

    def lines(self) -> list[str]:
        return [f"error: {self.problem}", *([f"fix: {self.fix}"] if self.fix else [])]
