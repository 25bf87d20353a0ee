"""`python tools/convert.py ...` is `lycoft-convert ...` (`lycoft.cli.convert`) run from a lycoft checkout."""

import sys

from lycoft.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
