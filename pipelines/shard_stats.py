"""`mmt shards stats` as a script: `python pipelines/shard_stats.py --help`."""

import sys

from mmt.data.cli import main

if __name__ == "__main__":
    sys.exit(main(["stats", *sys.argv[1:]]))
