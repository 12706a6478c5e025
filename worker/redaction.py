"""Secrets scrubbed from whatever leaves the process: log lines, events, dead letters, spans.

Two nets, because neither alone is enough:

* **patterns** of secrets by their shape (``Bearer …``, ``password=…``, a URL's user and
  password), for text whose secrets the worker never knew;
* **known secrets**: every credential the configuration holds and every token a vendor
  issued, looked for literally and in the spellings a vendor could echo them in (the
  form-encoded body of a token request, a JSON string). A vendor that echoes a request
  (a debugging proxy, a compromised endpoint) then echoes nothing usable.

A :class:`Redactor` is made once per process from the settings and told each token as it
is issued; the log handler, the handler's events and the vendor senders share it. Secrets
shorter than :data:`MIN_SECRET_CHARS` are not looked for: they would match ordinary text
everywhere (and are too short to be credentials worth the name).
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, quote_plus

import ahocorasick
from pydantic_core import to_json

REDACTED = "[redacted]"
MIN_SECRET_CHARS = 4
TOKENS_KEPT_PER_SCOPE = 8  # an account's recent tokens: a vendor may echo an older one
# Secrets by their shape, in any text (exception messages included).
SECRET_PATTERNS = (
    re.compile(r"(?i)(bearer\s+)[^\s\"',]+"),
    re.compile(
        r"(?i)((?:access_token|refresh_token|password|client_secret|token_secret|secret)"
        r"[\"']?\s*[:=]\s*[\"']?)[^\s\"'&,}]+"
    ),
    # A URL's user and password: amqp://relay:pw@rabbit → amqp://[redacted]@rabbit
    re.compile(r"(?i)(\b[a-z][a-z0-9+.\-]*://)[^\s/?#]+(?=@)"),
)


def spellings(secret: str) -> set[str]:
    """``secret`` as it may come back: as sent, form-encoded, and inside a JSON string."""
    return {secret, quote_plus(secret, safe=""), quote(secret, safe=""), json.dumps(secret)[1:-1]}


class Redactor:
    """The secrets one process knows, and text (or a JSON value) without them.

    Known secrets are found with an Aho-Corasick automaton (pyahocorasick): one pass over
    the text whatever their number. A regular expression of hundreds of alternatives (a
    hundred tenants' credentials and tokens) took seconds on a megabyte-sized answer
    where the automaton takes milliseconds (``bench/README.md``)."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._configured = {s for s in secrets if len(s) >= MIN_SECRET_CHARS}
        self._issued: dict[str, deque[str]] = {}  # by scope (a vendor account): its tokens
        self._known: ahocorasick.Automaton | None = None
        self._compile()

    def remember(self, scope: str, secret: str) -> None:
        """A secret issued at run time (a vendor's access or refresh token) for ``scope``;
        the last few of each scope are kept."""
        if len(secret) < MIN_SECRET_CHARS:
            return
        issued = self._issued.setdefault(scope, deque(maxlen=TOKENS_KEPT_PER_SCOPE))
        if secret not in issued:
            issued.append(secret)
            self._compile()

    def text(self, text: str) -> str:
        """``text`` (a log line, an error message) with every known secret and every
        secret-shaped value replaced."""
        text = self.known(text)
        for pattern in SECRET_PATTERNS:
            text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
        return text

    def known(self, text: str) -> str:
        """``text`` with every known secret replaced."""
        known = self._known  # swapped whole by _compile: safe to read from any thread
        if known is None:
            return text
        found = sorted((end - len(secret) + 1, end + 1) for end, secret in known.iter(text))
        if not found:
            return text
        merged: list[list[int]] = []  # overlapping or nested matches are one span
        for start, end in found:
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        pieces, at = [], 0
        for start, end in merged:
            pieces += [text[at:start], REDACTED]
            at = end
        return "".join(pieces) + text[at:]

    def value(self, value: Any) -> Any:
        """A JSON value (a vendor's answer) without the known secrets, keys included. The
        whole value is searched once; only one that holds a secret is walked."""
        known = self._known
        if known is None or value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, str):
            return self.known(value)
        if next(known.iter(to_json(value).decode()), None) is None:
            return value
        return self._walked(value)

    def _walked(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.known(value)
        if isinstance(value, list):
            return [self._walked(item) for item in value]
        if isinstance(value, dict):
            return {self.known(str(key)): self._walked(item) for key, item in value.items()}
        return value

    def _compile(self) -> None:
        secrets = set(self._configured)
        for issued in self._issued.values():
            secrets.update(issued)
        variants = {v for s in secrets for v in spellings(s) if len(v) >= MIN_SECRET_CHARS}
        if not variants:
            self._known = None
            return
        automaton = ahocorasick.Automaton()
        for variant in variants:
            automaton.add_word(variant, variant)
        automaton.make_automaton()
        self._known = automaton
