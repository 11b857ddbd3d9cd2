"""Run DeepSpeed's ``ds_to_universal`` converter with mmt's fix for scalar (0-dim) parameters.

The fix is `mmt.ds_compat.patch_ds_to_universal`; everything else is DeepSpeed's own code, run as
``python -m mmt.ckpt.ds_universal_entry [--trust-checkpoint] <ds_to_universal arguments>``. The converter unpickles
every file itself, so it runs inside `mmt.ckpt.torchio.checkpoint_loading`: a file naming a class outside the
allow-list is refused before it loads (its forked workers inherit the check).
"""

from __future__ import annotations

import sys

from mmt.ckpt.layout import CheckpointError
from mmt.ckpt.torchio import TRUST_FLAG, checkpoint_loading
from mmt.config.errors import ConfigError
from mmt.ds_compat import patch_ds_to_universal


def main() -> None:
    trust = TRUST_FLAG in sys.argv
    sys.argv = [a for a in sys.argv if a != TRUST_FLAG]
    try:
        ds = patch_ds_to_universal()  # worker processes are forked and inherit the fix
        with checkpoint_loading(trust):
            ds.main(ds.parse_arguments())
    except (CheckpointError, ConfigError) as e:  # one line for the parent to show, not a traceback
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
