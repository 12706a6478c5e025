"""Secrets never reach a log line."""

from __future__ import annotations

import io
import logging

import pytest

from worker.ops.logs import RedactingFilter, redact

SECRETS = ["eyJhbGciOi.secret-token", "hunter2", "s3cr3t-client"]


@pytest.mark.parametrize(
    "text",
    [
        "Authorization: Bearer eyJhbGciOi.secret-token",
        "grant_type=password&username=api&password=hunter2",
        '{"access_token": "eyJhbGciOi.secret-token", "token_type": "Bearer"}',
        "client_secret=s3cr3t-client&grant_type=client_credentials",
    ],
)
def test_secrets_are_redacted(text: str):
    assert not any(secret in redact(text) for secret in SECRETS)


def test_exception_text_is_redacted_too():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("test.redaction")
    logger.addHandler(handler)
    try:
        raise RuntimeError("token request failed: password=hunter2")
    except RuntimeError:
        logger.exception("vendor call failed with Bearer %s", "eyJhbGciOi.secret-token")
    finally:
        logger.removeHandler(handler)
    output = stream.getvalue()
    assert "vendor call failed" in output and "RuntimeError" in output
    assert not any(secret in output for secret in SECRETS)


def test_a_text_line_carries_the_commands_fields_and_a_hostile_id_can_not_forge_a_line():
    from worker.ops.logs import handler_for

    stream = io.StringIO()
    logger = logging.getLogger("test.fields")
    logger.addHandler(handler_for("text", stream))
    logger.setLevel(logging.INFO)
    try:
        logger.info("command %s", "failed", extra={
            "command_id": "id-1\n2026-01-01 INFO forged: line", "idempotency_key": "key-1",
            "command_type": "cancel-task", "tenant": "default", "outcome": "failed",
            "error_code": "vendor_rejected", "attempts": 2,
        })
        logger.info("command succeeded", extra={"command_id": "id-2", "idempotency_key": "id-2"})
    finally:
        logger.handlers.clear()
    first, second = stream.getvalue().splitlines()
    assert first.endswith(
        'command failed command_id="id-1\\n2026-01-01 INFO forged: line" idempotency_key=key-1 '
        "command_type=cancel-task tenant=default outcome=failed error_code=vendor_rejected "
        "attempts=2"
    )
    assert second.endswith("command succeeded command_id=id-2")  # the key only when not the id
