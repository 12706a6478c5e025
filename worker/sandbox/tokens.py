"""OAuth tokens the sandbox issued: lookups, refresh rotation, revocation."""

import secrets
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Grant:
    """What a token endpoint hands out."""

    access_token: str
    refresh_token: str | None
    expires_in_s: int


@dataclass(frozen=True, slots=True)
class _Issued:
    vendor: str
    account: str
    expires_at: float


class TokenStore:
    """Access and refresh tokens of all vendors; not thread-safe (the state locks it)."""

    def __init__(self, ttl_s: int) -> None:
        self._ttl_s = ttl_s
        # Insertion order is expiry order (one TTL for all), so pruning pops from the front.
        self._access: OrderedDict[str, _Issued] = OrderedDict()
        self._refresh: dict[str, tuple[str, str]] = {}

    def issue(self, vendor: str, account: str, now: float, *, with_refresh: bool) -> Grant:
        """A new access token (and refresh token if asked) for `account`."""
        self._prune(now)
        access = secrets.token_urlsafe(24)
        self._access[access] = _Issued(vendor, account, now + self._ttl_s)
        refresh = None
        if with_refresh:
            refresh = secrets.token_urlsafe(32)
            self._refresh[refresh] = (vendor, account)
        return Grant(access, refresh, self._ttl_s)

    def refresh(self, vendor: str, refresh_token: str, now: float) -> Grant | None:
        """New tokens for a valid refresh token, which is spent; None if unknown."""
        owner = self._refresh.get(refresh_token)
        if owner is None or owner[0] != vendor:
            return None
        del self._refresh[refresh_token]
        return self.issue(vendor, owner[1], now, with_refresh=True)

    def account_for(self, vendor: str, access_token: str, now: float) -> str | None:
        """Account owning a live access token of `vendor`, else None."""
        issued = self._access.get(access_token)
        if issued is None or issued.vendor != vendor or issued.expires_at <= now:
            return None
        return issued.account

    def revoke_access(self) -> None:
        """Invalidate every access token; refresh tokens keep working."""
        self._access.clear()

    def _prune(self, now: float) -> None:
        while self._access:
            token, issued = next(iter(self._access.items()))
            if issued.expires_at > now:
                return
            del self._access[token]
