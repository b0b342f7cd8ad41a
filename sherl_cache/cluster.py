"""Connecting to an existing dask.distributed scheduler, shared by sweeps and extraction."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from distributed import Client


def connect(address: str, timeout: float = 5.0) -> Client:
    """A client of an existing scheduler, or a one-line ConfigError within ``timeout`` seconds:
    an unreachable cluster must fail before any work starts, not after a long default wait."""
    from distributed import Client

    try:
        return Client(address, timeout=timeout, set_as_default=False)
    except (OSError, ValueError, TypeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"cannot reach the dask scheduler at {address!r} (--scheduler) within {timeout:g} s: "
            f"{reason[:200]}"
        ) from None
