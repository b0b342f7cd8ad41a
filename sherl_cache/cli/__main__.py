"""``python -m sherl_cache.cli``."""

import sys

from . import main

sys.exit(main())
