"""`mmt shards demo` as a script: `python pipelines/build_demo.py --help`."""

import sys

from mmt.data.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
