"""The argument parser every `mmt` subcommand uses: a bad flag or value is one line and exit code 2.

argparse's default prints the whole usage block before the error; with several nested subcommands that is
a screen of text around the one line that matters. ``--help`` still prints the full usage.
"""

from __future__ import annotations

import argparse
from typing import NoReturn


class ArgumentParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose errors are ``PROG: error: MESSAGE (see PROG --help)`` and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
