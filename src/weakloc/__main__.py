"""``python -m weakloc ...``: the command line, also as ``torchrun ... -m weakloc localize ...``."""

from weakloc.cli import main

main()
