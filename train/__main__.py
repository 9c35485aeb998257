"""`python -m train ...` = `sae train ...`; the entry point for torchrun (`torchrun -m train ...`)."""

import sys

import torch.distributed as dist

from sae.cli import main

try:
    main(["train", *sys.argv[1:]])
finally:
    # the process group's owner ends it, as torch asks, rather than interpreter exit racing the
    # peers' teardown (a rank aborted once in CI, SIGABRT, with its cause not captured)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
