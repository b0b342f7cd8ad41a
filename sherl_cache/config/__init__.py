"""Typed settings: one dataclass per command, the single source of its options and defaults."""
