"""``python -m subpeft ...``: the command line (what torchrun runs: ``torchrun --nproc-per-node N -m subpeft train ...``)."""

from .cli import entry

if __name__ == "__main__":
    entry()
