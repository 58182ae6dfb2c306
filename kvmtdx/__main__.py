import sys

from kvmtdx.cli import main

sys.exit(main())
