"""sherl-cache: run a frozen backbone once, cache its hidden states, train SHERL from the cache."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from .errors import SherlCacheError  # noqa: E402
from .store.cache import Cache, open_cache  # noqa: E402

if TYPE_CHECKING:
    from .inference.run import Run, load_run

__all__ = ["Cache", "Run", "SherlCacheError", "__version__", "load_run", "open_cache"]


def __getattr__(name: str) -> Any:
    # Prediction pulls in torch and transformers; importing it lazily keeps `import sherl_cache`
    # (and every CLI command that only reads caches) fast.
    if name in ("Run", "load_run"):
        from .inference import run

        return getattr(run, name)
    raise AttributeError(f"module 'sherl_cache' has no attribute {name!r}")
