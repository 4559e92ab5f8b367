"`python -m fsmtl` (and `torchrun -m fsmtl`): the `fsmtl` command."
import sys

from .cli import main

sys.exit(main())
