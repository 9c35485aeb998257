"""`python -m train ...` = `sae train ...`; the entry point for torchrun (`torchrun -m train ...`)."""

import sys

from sae.cli import main

main(["train", *sys.argv[1:]])
