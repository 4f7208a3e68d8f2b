"""Several ``subpeft train`` runs in one launch (tests/dist/test_distributed.py): one torchrun start serves them
all. Argument: a JSON file with a list of argument lists for ``subpeft.cli.main``. The process group, when
launched by torchrun, is started here once, so that the runs share it (train_run finds it running)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch.distributed as dist  # noqa: E402

from subpeft import distributed as spd  # noqa: E402
from subpeft.cli import main  # noqa: E402

if __name__ == "__main__":
    runs = json.loads(Path(sys.argv[1]).read_text())
    if spd.launched():
        dist.init_process_group("gloo")
    status = 0
    for argv in runs:
        status = max(status, main(argv))
    spd.end_process(status)  # ends the group and exits without finalization (gloo's threads can abort it)
