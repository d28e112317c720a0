"""``python -m flor_lightning``: the ``flor`` command, for an environment whose scripts folder is not on PATH."""

import sys

from flor_lightning._cli import main

sys.exit(main())
