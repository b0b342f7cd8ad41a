"""``python -m sherl_cache``: the same command line as ``sherl-cache``."""

from .cli import main

if __name__ == "__main__":
    main()
