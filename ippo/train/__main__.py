"""``python -m ippo.train``: the ``ippo`` command line."""

import sys

from ippo.train.cli import main

sys.exit(main())
