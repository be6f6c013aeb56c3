"""`python -m earful ...` is `earful ...` (so `torchrun -m earful train ...` works too)."""

import sys

from .cli import main

sys.exit(main())
