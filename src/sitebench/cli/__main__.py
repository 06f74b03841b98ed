"""``python -m sitebench.cli``: the same command as ``sitebench``."""

import sys

from sitebench.cli import main

sys.exit(main())
