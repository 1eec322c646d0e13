"""`python -m swinkit ...` (what torchrun runs: `torchrun --nproc_per_node=N -m swinkit train ...`)."""
import sys

from .cli import main

sys.exit(main())
