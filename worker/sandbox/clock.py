"""Wall-clock timestamps as the vendors print them."""

from datetime import UTC, datetime


def utc_now_iso() -> str:
    """Now, as an RFC 3339 UTC timestamp with a `Z` suffix."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def is_iso_time(value: object) -> bool:
    """True for a string that parses as an ISO 8601 date-time."""
    if not isinstance(value, str) or "T" not in value:
        return False
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True
