"""`python -m sinkscope ...` (also what `torchrun ... -m sinkscope ...` runs)."""
import sys

from .cli import main

sys.exit(main())
