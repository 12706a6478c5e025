"""Vendor credentials turned into Authorization headers.

Tokens are cached per account and renewed a margin before they expire; a refresh grant is
tried first and the account's own grant when that fails. Secrets stay in ``SecretStr``
until the moment a form is sent, and neither tokens nor forms are ever logged.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

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
        on_issued: Callable[[str], None] | None = None,
    ) -> None:
        """``on_issued`` is told every access and refresh token as it arrives (the
        redactor remembers them, so no answer can echo them out of the process)."""
        self._client = client
        self._token_url = token_url
        self._grant = grant
        # OAuth2 clients (fylr) authenticate every grant, the refresh grant included.
        self._client_fields: Form = client_fields or {}
        self._vendor = vendor
        self._margin_s = refresh_margin_s
        self._on_issued = on_issued or (lambda token: None)
        self._access: str | None = None
        self._refresh: str | None = None
        self._renew_at = 0.0
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
        return self._access is not None and time.monotonic() < self._renew_at

    async def _renew(self) -> None:
        if self._refresh is not None:
            try:
                refresh: Form = {"grant_type": "refresh_token", "refresh_token": self._refresh}
                await self._fetch({**self._client_fields, **refresh})
                return
            except (PermanentFailure, TransientFailure):
                # Refused, expired or answered with nonsense: the account's own grant
                # may still work.
                self._refresh = None
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
            refused = (
                "answered with a redirect, which is never followed: check the tenant's host"
                if 300 <= response.status_code <= 399
                else "refused the configured credentials; check the tenant's account settings"
            )
            raise PermanentFailure(
                ErrorCode.VENDOR_AUTH_FAILED,
                f"{self._vendor} token endpoint {refused} ({response.status_code})",
                vendor_status=response.status_code,
            )
        self._store(self._issued(response))

    def _issued(self, response: httpx.Response) -> IssuedToken:
        """The token in a 200 answer, checked before it is kept: one that could not be
        sent (CR/LF, spaces, non-ASCII) or an answer that is no token at all is a failed
        token request, retried like one, never a token cached to fail every call."""
        try:
            return IssuedToken.model_validate_json(response.content)
        except ValidationError as error:
            problem = error.errors(include_url=False)[0]
            where = ".".join(str(part) for part in problem["loc"]) or "the answer"
            raise TransientFailure(
                ErrorCode.VENDOR_UNAVAILABLE,
                f"{self._vendor} token endpoint answered 200 without a usable token "
                f"({where}: {problem['msg']})",
                vendor_status=200,
            ) from None

    def _store(self, issued: IssuedToken) -> None:
        access = issued.access_token
        self._on_issued(access)
        if issued.refresh_token is not None:
            # A refresh answer carries a new refresh token too; the old one is spent.
            self._refresh = issued.refresh_token
            self._on_issued(self._refresh)
        lifetime_s = issued.lifetime_s()
        # A short-lived token is renewed halfway through its life, not on every call.
        self._renew_at = time.monotonic() + lifetime_s - min(self._margin_s, lifetime_s / 2)
        self._access = access


TOKEN_CHARS = r"^[\x21-\x7e]{1,8192}$"  # what an Authorization header can carry: visible ASCII
DEFAULT_LIFETIME_S = 3600.0  # OAuth2: expires_in is only recommended; ESET's live an hour
MAX_LIFETIME_S = 86_400.0  # longer is not believed: a 401 renews it anyway


class IssuedToken(BaseModel):
    """A token endpoint's 200 answer (RFC 6749 5.1), as far as the worker uses it."""

    model_config = ConfigDict(extra="ignore")

    access_token: Annotated[str, Field(pattern=TOKEN_CHARS, repr=False)]
    refresh_token: Annotated[str | None, Field(pattern=TOKEN_CHARS, repr=False)] = None
    # Seconds; some servers send it as a string of digits. Absent or null: an hour. 0: good
    # for the call at hand only (it is renewed for the next).
    expires_in: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None

    def lifetime_s(self) -> float:
        lifetime_s = DEFAULT_LIFETIME_S if self.expires_in is None else self.expires_in
        return min(lifetime_s, MAX_LIFETIME_S)
