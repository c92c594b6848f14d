"""`python -m dsv3.train ...` (the form torchrun launches): the same as `dsv3 train ...`."""

import sys

from dsv3.errors import run_cli
from dsv3.train.cli import train_main

sys.exit(run_cli("dsv3 train", train_main))
