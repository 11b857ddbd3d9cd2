"""`mmt shards build` as a script: `python pipelines/build_shards.py --help`."""

import sys

from mmt.data.cli import main

if __name__ == "__main__":
    sys.exit(main(["build", *sys.argv[1:]]))
