"""The redactor: no known secret survives, in any spelling a vendor could echo it in, and
text without one is left as it was."""

from __future__ import annotations

import json
from urllib.parse import quote_plus

from hypothesis import given
from hypothesis import strategies as st

from worker.redaction import REDACTED, Redactor

SECRETS = ["p@ss w0rd&more", "tok.en-123_abc", "a\"quoted\\secret"]

secrets = st.sampled_from(SECRETS)
fillers = st.text(max_size=40)


@given(st.lists(st.tuples(fillers, secrets, st.sampled_from(["raw", "form", "json"]))),
       fillers)
def test_no_known_secret_survives_in_any_spelling(pieces: list[tuple[str, str, str]],
                                                   tail: str) -> None:
    spell = {"raw": str, "form": lambda s: quote_plus(s, safe=""),
             "json": lambda s: json.dumps(s)[1:-1]}
    text = "".join(filler + spell[how](secret) for filler, secret, how in pieces) + tail
    scrubbed = Redactor(SECRETS).known(text)
    for secret in SECRETS:
        for how in spell.values():
            assert how(secret) not in scrubbed


@given(st.text(alphabet=st.characters(blacklist_characters="pta\""), max_size=200))
def test_text_without_a_secret_is_left_as_it_was(text: str) -> None:
    assert Redactor(SECRETS).known(text) == text


def test_a_token_learnt_at_run_time_is_scrubbed_from_keys_and_values() -> None:
    redactor = Redactor()
    redactor.remember("eset|api", "issued-token-123")
    body = {"issued-token-123": ["Bearer issued-token-123", 7, None, True], "n": 1.5}
    assert redactor.value(body) == {REDACTED: [f"Bearer {REDACTED}", 7, None, True], "n": 1.5}


def test_only_the_last_tokens_of_a_scope_are_kept() -> None:
    redactor = Redactor()
    for number in range(20):
        redactor.remember("fylr|account", f"token-{number:04d}")
    assert redactor.known("token-0000") == "token-0000"
    assert redactor.known("token-0019") == REDACTED


def test_secret_shaped_values_are_scrubbed_from_log_text() -> None:
    text = Redactor().text("Authorization: Bearer abc.def password=hunter2 amqp://u:p@host/")
    assert "abc.def" not in text and "hunter2" not in text and "u:p@" not in text
