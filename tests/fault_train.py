"""`python -m torch.distributed.run ... tests/fault_train.py [key=value ...]`:
megagpt.train, command line and all, with the faults of tests/faults.py
(MEGAGPT_FAULT_*) injected.  For tests only: `-m megagpt.train` never reads
those variables."""

from __future__ import annotations

from faults import fault_hooks  # tests/ is this script's folder, first on sys.path

from megagpt import train

if __name__ == "__main__":
    train.main(extra_hooks=fault_hooks)
