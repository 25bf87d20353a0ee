"""`python tools/tiny_model.py ...` is `lycoft-tiny-model ...` (`lycoft.cli.tiny_model`) run from a lycoft checkout."""

import sys

from lycoft.cli.tiny_model import main

if __name__ == "__main__":
    sys.exit(main())
