"""Vendor credentials turned into Authorization headers.

Tokens are cached per account and renewed a margin before they expire; a refresh grant is
tried first and the account's own grant when that fails. Secrets stay in ``SecretStr``
until the moment a form is sent, and neither tokens nor forms are ever logged.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import SecretStr

from schemas.events import ErrorCode
from worker.errors import PermanentFailure, TransientFailure
from worker.vendors.transport import VendorClient, transport_failure

Form = dict[str, str | SecretStr]


@dataclass(frozen=True)
class StaticBearer:
    """A fixed ``Bearer`` value (Spaaza's ``id:secret``)."""

    token: SecretStr

    async def authorization(self) -> str:
        return f"Bearer {self.token.get_secret_value()}"

    def invalidate(self, rejected: str) -> None:
        return None  # nothing to renew: a 401 stands


class OAuthToken:
    """An OAuth2 access token from a form-encoded token endpoint, renewed before expiry."""

    def __init__(
        self,
        client: VendorClient,
        token_url: str,
        grant: Form,
        vendor: str,
        refresh_margin_s: float = 300.0,
        client_fields: Form | None = None,
    ) -> None:
        self._client = client
        self._token_url = token_url
        self._grant = grant
        # OAuth2 clients (fylr) authenticate every grant, the refresh grant included.
        self._client_fields: Form = client_fields or {}
        self._vendor = vendor
        self._margin_s = refresh_margin_s
        self._access: str | None = None
        self._refresh: str | None = None
        self._expires_at = 0.0
        self._lock = asyncio.Lock()

    async def authorization(self) -> str:
        if not self._fresh():
            async with self._lock:  # one renewal at a time; the others reuse its token
                if not self._fresh():
                    await self._renew()
        return f"Bearer {self._access}"

    def invalidate(self, rejected: str) -> None:
        if rejected == f"Bearer {self._access}":
            self._access = None

    def _fresh(self) -> bool:
        return self._access is not None and time.monotonic() < self._expires_at - self._margin_s

    async def _renew(self) -> None:
        if self._refresh is not None:
            try:
                refresh: Form = {"grant_type": "refresh_token", "refresh_token": self._refresh}
                await self._fetch({**self._client_fields, **refresh})
                return
            except PermanentFailure:
                self._refresh = None  # refresh token expired or revoked: log in again
        await self._fetch({**self._client_fields, **self._grant})

    async def _fetch(self, form: Form) -> None:
        plain = {
            name: value.get_secret_value() if isinstance(value, SecretStr) else value
            for name, value in form.items()
        }
        try:
            response = await self._client.post(self._token_url, data=plain)
        except httpx.TransportError as error:
            raise transport_failure(f"{self._vendor} token endpoint", error) from error
        if response.status_code >= 500 or response.status_code == 429:
            raise TransientFailure(
                ErrorCode.VENDOR_UNAVAILABLE,
                f"{self._vendor} token endpoint answered {response.status_code}",
                vendor_status=response.status_code,
            )
        if response.status_code != 200:
            raise PermanentFailure(
                ErrorCode.VENDOR_AUTH_FAILED,
                f"{self._vendor} refused the configured credentials ({response.status_code}); "
                "check the tenant's account settings",
                vendor_status=response.status_code,
            )
        self._store(response.json())

    def _store(self, answer: dict[str, Any]) -> None:
        self._access = str(answer["access_token"])
        # A refresh answer carries a new refresh token too; the old one is spent.
        self._refresh = answer.get("refresh_token") or self._refresh
        self._expires_at = time.monotonic() + float(answer.get("expires_in", 3600))
