"""``python -m backpatch.cli`` runs the command line, as ``python -m backpatch`` does."""

import sys

from . import main

sys.exit(main())
