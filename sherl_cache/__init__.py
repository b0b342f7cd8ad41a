"""sherl-cache: run a frozen backbone once, cache its hidden states, train SHERL from the cache."""

__version__ = "0.1.0"

from .cache import Cache, open_cache  # noqa: E402
from .errors import SherlCacheError  # noqa: E402

__all__ = ["Cache", "SherlCacheError", "__version__", "open_cache"]
