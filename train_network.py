"""Train an OFT/BOFT adapter: ``accelerate launch train_network.py --config configs/<x>.toml [--flag value ...]``.

Every flag is documented by ``--help`` and can also be a key in the ``--config`` TOML. The work lives in
`lycoft.training` (`lycoft.training.loop.train` runs it from Python).
"""

import sys

from lycoft.training.loop import main

if __name__ == "__main__":
    sys.exit(main())
