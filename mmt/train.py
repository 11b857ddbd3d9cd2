"""``python -m mmt.train CONFIG [key=value ...]``: the same as ``mmt train``."""

from mmt.training.cli import train_main

if __name__ == "__main__":
    raise SystemExit(train_main())
