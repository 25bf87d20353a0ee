"""`python tools/pretrain_toy.py ...` trains the toy judge and ``builtin:toy-sd1`` (`lycoft.cli.pretrain_toy`)."""

import sys

from lycoft.cli.pretrain_toy import main

if __name__ == "__main__":
    sys.exit(main())
