"""``python -m cvxmri``: the command line, also as torchrun starts it
(``torchrun --nproc-per-node N -m cvxmri train ...``)."""

import sys

from cvxmri.cli import main

sys.exit(main())
