"""`python -m acai_fast.cli ...` (torchrun runs it so): the `acai-fast` command."""
import sys

from . import main

sys.exit(main())
