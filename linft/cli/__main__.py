import sys

from linft.cli.app import main

sys.exit(main())
