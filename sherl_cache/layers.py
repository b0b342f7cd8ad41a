"""Hidden-state index specs shared by ``extract --layers`` and ``train --tap``.

Indices follow the transformers convention: 0 is the embedding output, i (1 <= i < L) is the
output of layer i-1 (= the input of layer i), and L is the final output.
"""

from __future__ import annotations

from .errors import ConfigError


def is_layer_spec(spec: str) -> bool:
    """Whether ``spec`` is spelled like a layer spec; checked before any model is loaded, so a
    typo fails at once rather than after the data is read (ranges need the model)."""
    text = spec.strip().lower()
    if text == "all":
        return True
    if text.startswith("every:"):
        step = text.split(":", 1)[1]
        return step.isdigit() and int(step) >= 1
    try:
        [int(part) for part in text.split(",")]
    except ValueError:
        return False
    return True


def parse_layer_spec(spec: str, num_layers: int, flag: str = "--layers") -> tuple[int, ...]:
    """Resolve ``all``, ``every:N`` or ``i,j,k`` (negative counts from L) to sorted indices."""
    text = spec.strip().lower()
    top = num_layers
    if text == "all":
        return tuple(range(top + 1))
    if text.startswith("every:"):
        step_text = text.split(":", 1)[1]
        if not step_text.isdigit() or int(step_text) < 1:
            raise ConfigError(f"bad layer spec {spec!r} ({flag}): every:N needs a positive N")
        return tuple(range(0, top + 1, int(step_text)))
    indices: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        try:
            index = int(part)
        except ValueError:
            raise ConfigError(
                f"bad layer spec {spec!r} ({flag}): use 'all', 'every:N' or a list like 0,4,8"
            ) from None
        if index < 0:
            index += top + 1
        if not 0 <= index <= top:
            raise ConfigError(
                f"layer index {part} is out of range ({flag}): this model has hidden-state "
                f"indices 0..{top}"
            )
        indices.add(index)
    if not indices:
        raise ConfigError(f"empty layer spec ({flag})")
    return tuple(sorted(indices))
