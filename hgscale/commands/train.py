"""``hgscale train --config CONFIG [key=value ...]``: the same as ``python hgscale/train.py`` (one process, or
every rank under ``deepspeed`` / ``torchrun`` / srun)."""
from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from hgscale.train import main as train_main

    return train_main(argv, prog="hgscale train")
