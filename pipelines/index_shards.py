"""`mmt shards index` as a script: `python pipelines/index_shards.py --help`."""

import sys

from mmt.data.cli import main

if __name__ == "__main__":
    sys.exit(main(["index", *sys.argv[1:]]))
