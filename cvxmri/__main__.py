"""``python -m cvxmri``: the command line, also as torchrun starts it
(``torchrun --nproc-per-node N -m cvxmri train ...``)."""

import logging
import os
import sys

from cvxmri.cli import main

status = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a torchrun launch (cvxmri.distributed)
    # A finished run's process was seen to abort now and then at interpreter
    # finalisation (SIGABRT, "terminate called without an active exception"), as when a
    # gloo worker thread still releases a collective's tensors then (pytorch/pytorch
    # #179291). So the process ends here, its output flushed, without finalisation.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
sys.exit(status)
