"""``python -m backpatch`` (and ``accelerate launch -m backpatch eval ...``) run the command line."""

import sys

from .cli import main

sys.exit(main())
