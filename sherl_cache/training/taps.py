"""Tap policy: which hidden states the fusion reads, and whether the cache holds them."""

from __future__ import annotations

from ..data.tasks import TaskSpec
from ..errors import CacheMismatchError, ConfigError
from ..layers import parse_layer_spec
from ..store.cache import Cache
from .discovery import family_of_cache


def resolve_taps(spec: str, cache: Cache, k: int) -> tuple[int, ...]:
    """The hidden-state indices the fusion reads: ``default`` is the family's choice for the
    depth, limited to what the cache stores; explicit forms must lie at or below the split."""
    num_layers, stored = cache.num_layers, cache.layers
    split = num_layers - k
    if spec == "default":
        defaults = family_of_cache(cache).default_taps(num_layers, k)
        taps = tuple(t for t in defaults if t in stored or t == split)
    else:
        taps = parse_layer_spec(spec, num_layers, flag="--tap")
    above = [t for t in taps if t > split]
    if above:
        raise ConfigError(
            f"tapped layer(s) {above} are above the split (--tap): with --late-layers {k} the "
            f"fusion reads hidden-state indices 0..{split}"
        )
    return taps


def check_stored(cache: Cache, taps: tuple[int, ...], split: int, task: TaskSpec) -> None:
    """Refuse a cache that lacks a tapped state or the split's, with the command that has them."""
    missing = sorted((set(taps) | {split}) - set(cache.layers))
    if missing:
        layers = ",".join(map(str, sorted(set(cache.layers) | set(missing))))
        raise CacheMismatchError(
            f"cache {cache.path} does not store hidden-state indices {missing} needed by "
            f"--tap/--late-layers (field layers: cache has {cache.layers}); extend it into a "
            f"new cache that has them with: {extend_command(cache, task, layers)} (new states "
            "need the forward pass again, docs/cache-format.md)"
        )


def extend_command(cache: Cache, task: TaskSpec, layers: str) -> str:
    """The cache's own extract command with ``--layers`` replaced, written under a cache root
    (an explicit ``--cache`` path is taken by this cache)."""
    import shlex

    recorded = cache.manifest.get("command")
    if not recorded:
        model = cache.manifest["model"]["model_id"]
        return f"sherl-cache extract --model {model} --task {task.name} --layers {layers}"
    parts, out = shlex.split(recorded), []
    while parts:
        part = parts.pop(0)
        if part in ("--layers", "--cache"):
            parts.pop(0)
            continue
        out.append(part)
    if "--cache-root" not in out:
        out += ["--cache-root", "cache"]
    return shlex.join([*out, "--layers", layers])
