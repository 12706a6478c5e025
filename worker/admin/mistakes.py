"""Errors of the environment an operator can fix (a refused password, a broker that is not
running, a store that does not answer), turned into :class:`UserError`: one line saying
what is wrong, one saying what to do."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

from amqp.exceptions import AccessRefused, NotAllowed
from sqlalchemy.exc import OperationalError as SqlError

from worker.admin import UserError
from worker.admin.config import safe_url
from worker.broker.connection import BrokerCertificateRefused
from worker.errors import (
    StoreUnavailable,
    certificate_fix,
    certificate_reason,
    refused_certificate,
)

BROKER_SETTING = "RELAY_BROKER_URL"


@contextmanager
def broker_errors(url: str) -> Iterator[None]:
    """Raise a UserError for a broker that refuses or can not be reached inside."""
    try:
        yield
    except Exception as error:
        mistake = broker_mistake(error, url)
        if mistake is None:
            raise
        raise mistake from error


def broker_mistake(error: BaseException, url: str) -> UserError | None:
    where = safe_url(url)
    refused = BrokerCertificateRefused.behind(error, url)
    if refused is not None:  # before OSError: an SSL error is one, but not an outage
        return UserError(refused.problem, refused.fix)
    if isinstance(error, AccessRefused):
        return UserError(
            f"the broker at {where} refused the login",
            f"check the user and password in {BROKER_SETTING}",
        )
    if isinstance(error, NotAllowed):
        return UserError(
            f"the broker at {where} refused the virtual host",
            f"check the vhost at the end of {BROKER_SETTING} (the default one is //)",
        )
    if isinstance(error, socket.gaierror):
        return UserError(
            f"the broker's host in {where} is not known", f"check the host in {BROKER_SETTING}"
        )
    if isinstance(error, (ConnectionError, TimeoutError, OSError)):
        return UserError(
            f"can not reach the broker at {where} ({_reason(error)})",
            f"start it (bash .ci/services starts a local one) or fix {BROKER_SETTING}",
        )
    if isinstance(error, SqlError):
        return UserError(
            f"the embedded broker's file can not be opened ({where})",
            f"point {BROKER_SETTING} at a writable path",
        )
    return None


def lost_while_waiting(error: BaseException, url: str, command_id: str) -> UserError:
    """A connection lost while waiting for a command's result: not a broker to start,
    since the command was sent and is being (or will be) worked on; said with where to
    find its result."""
    return UserError(
        f"the connection to the broker at {safe_url(url)} was lost while waiting for the "
        f"result ({_reason(error)}); command {command_id} was sent and may still be running",
        f"look its result up with: command-relay result {command_id}",
    )


@contextmanager
def store_errors(url: str) -> Iterator[None]:
    """Raise a UserError for an idempotency store that does not answer inside."""
    try:
        yield
    except StoreUnavailable as error:
        refusal = refused_certificate(error)
        if refusal is not None:
            raise UserError(
                f"the idempotency store at {safe_url(url)} presented a TLS certificate that "
                f"was refused ({certificate_reason(refusal)})",
                certificate_fix(refusal, "RELAY_IDEMPOTENCY_URL", "RELAY_REDIS_TLS_CA_FILE"),
            ) from error
        raise UserError(
            f"the idempotency store at {safe_url(url)} does not answer "
            f"({_reason(error.__cause__ or error)})",
            "start it, or fix RELAY_IDEMPOTENCY_URL",
        ) from error


def _reason(error: BaseException) -> str:
    text = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return str(text).splitlines()[0][:120]
