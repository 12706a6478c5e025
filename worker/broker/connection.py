"""Opening a broker connection the same way everywhere (worker, client, tests).

``amqps://`` always verifies the broker's certificate *and its name*: kombu hands py-amqp
no TLS options of its own, and py-amqp checks the name only when it is given
``server_hostname`` (``amqp.transport.SSLTransport._wrap_socket_sni``), so without
:func:`tls_options` any certificate from a trusted CA would do for any broker.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kombu import Connection

from worker.broker import frames
from worker.errors import certificate_fix, certificate_reason, refused_certificate
from worker.settings import AMQP_SCHEMES, TlsFiles

EMBEDDED_SCHEME = "sqla+sqlite:///"
TLS_SCHEME = "amqps://"
TLS_PORT = 5671


def is_amqp(url: str) -> bool:
    return url.startswith(AMQP_SCHEMES)


def embedded_path(url: str) -> Path | None:
    """The file of an embedded (SQLite) broker URL; None for any other."""
    path = url.removeprefix(EMBEDDED_SCHEME)
    return Path(path) if url.startswith(EMBEDDED_SCHEME) and path else None


def connect(
    url: str,
    poll_interval_s: float = 0.02,
    heartbeat_s: int = 30,
    wait_for_confirms: bool = True,
    tls: TlsFiles | None = None,
) -> Connection:
    """A kombu connection (not yet connected).

    RabbitMQ: heartbeats on, and each publish waits for its confirm (kombu leaves confirms
    off, and without them a published event can vanish silently), unless
    ``wait_for_confirms`` is off because the caller tracks confirms itself. ``amqps://``
    verifies the broker's certificate and name (:func:`tls_options`, with the CA and
    client certificate of ``tls``: ``Settings.tls.broker``). The embedded broker
    (``worker/broker/embedded.py``) polls its SQLite file; ``poll_interval_s`` bounds how
    late it notices a new message.
    """
    if is_amqp(url):
        options = {"confirm_publish": wait_for_confirms}
        return Connection(
            url, transport_options=options, heartbeat=heartbeat_s,
            ssl=tls_options(url, tls) or False,
        )
    path = embedded_path(url)
    if path is not None:  # SQLite creates the file, not the directory it goes in
        path.parent.mkdir(parents=True, exist_ok=True)
    # SQLAlchemy and kombu's transport over it cost a RabbitMQ worker ~20 MB it never uses.
    from worker.broker.embedded import embedded_connection

    return embedded_connection(url, poll_interval_s)


def tls_options(url: str, tls: TlsFiles | None) -> dict[str, Any] | None:
    """py-amqp's TLS options for ``url``; None when it is not ``amqps://``. The broker's
    certificate is required and must name the host of the URL, as written there (kombu
    would put ``127.0.0.1`` for ``localhost``). ``tls`` adds the CA file (used instead of
    the system's CAs) and the client certificate and key."""
    if not url.startswith(TLS_SCHEME):
        return None
    options: dict[str, Any] = {
        "server_hostname": urlsplit(url).hostname or "localhost",
        "cert_reqs": ssl.CERT_REQUIRED,
    }
    if tls is not None:
        files = {"ca_certs": tls.ca_file, "certfile": tls.cert_file, "keyfile": tls.key_file}
        options.update({name: str(path) for name, path in files.items() if path is not None})
    return options


class BrokerCertificateRefused(Exception):
    """The broker's TLS certificate was refused: a setting (or the broker's certificate)
    to fix, not an outage to wait out, so the worker stops instead of reconnecting."""

    def __init__(self, url: str, refusal: ssl.SSLCertVerificationError) -> None:
        self.problem = (
            f"the broker at {_host(url)} presented a TLS certificate that was refused "
            f"({certificate_reason(refusal)})"
        )
        self.fix = certificate_fix(refusal, "RELAY_BROKER_URL", "RELAY_BROKER_TLS_CA_FILE")
        super().__init__(f"{self.problem}: {self.fix}")

    @classmethod
    def behind(cls, error: BaseException, url: str) -> BrokerCertificateRefused | None:
        """The refusal ``error`` is, or was raised from; None when it is something else."""
        if isinstance(error, cls):
            return error
        refusal = refused_certificate(error)
        return None if refusal is None else cls(url, refusal)


def _host(url: str) -> str:
    """``host:port`` of a broker URL (never its credentials)."""
    try:
        parts = urlsplit(url)
        return f"{parts.hostname or 'localhost'}:{parts.port or TLS_PORT}"
    except ValueError:
        return "(the host of RELAY_BROKER_URL)"


# Wherever connections are made, a delivery's properties are read by frames.py: a value
# py-amqp can not read costs that message its run, never the connection.
frames.install()
