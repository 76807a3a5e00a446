"""python -m iarmem_core: the command-line interface (see iarmem_core/cli.py)."""

import sys

from iarmem_core.cli import main

sys.exit(main())
