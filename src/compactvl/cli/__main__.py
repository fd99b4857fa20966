"""``python -m compactvl.cli ...``: the ``compactvl`` command, for launchers that start a module (``torchrun -m``,
``accelerate launch -m``)."""
import sys

from . import main

sys.exit(main())
