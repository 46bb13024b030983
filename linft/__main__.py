"""``python -m linft``: the ``linft`` command."""
import sys

from linft.cli.app import main

sys.exit(main())
