"""`python -m dsv3.train ...` (the form torchrun launches): the same as `dsv3 train ...`."""

import sys

from dsv3.train.cli import train_main

sys.exit(train_main())
