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
