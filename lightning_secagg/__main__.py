"""``python -m lightning_secagg`` runs the command line."""

import sys

from lightning_secagg.cli import main

sys.exit(main())
