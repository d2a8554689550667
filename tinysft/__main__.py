"""``python -m tinysft``: the same as the ``tinysft`` command."""
import sys

from .app.cli import main

sys.exit(main())
