"""Run DeepSpeed's ``ds_to_universal`` converter with one fix for scalar (0-dim) parameters.

For ZeRO-1/2 the converter reshapes each parameter's merged fragments to the parameter's shape and then
concatenates them along dim 0, which fails for a 0-dim parameter such as the CLIP temperature ("zero-dimensional
tensor cannot be concatenated"). Here such fragments are kept 1-element 1-d instead; DeepSpeed's universal loader
flattens every parameter before slicing out a rank's fragment, so it loads them unchanged. Everything else is
DeepSpeed's own code, run as ``python -m mmt.ckpt.ds_universal_entry [--trust-checkpoint] <ds_to_universal
arguments>``. The converter unpickles every file itself, so it runs inside `mmt.ckpt.torchio.checkpoint_loading`:
a file naming a class outside the allow-list is refused before it loads (its forked workers inherit the check).
"""

from __future__ import annotations

import sys

import torch

from mmt.ckpt.layout import CheckpointError
from mmt.ckpt.torchio import TRUST_FLAG, checkpoint_loading


def main() -> None:
    from deepspeed.checkpoint import ds_to_universal as ds

    trust = TRUST_FLAG in sys.argv
    sys.argv = [a for a in sys.argv if a != TRUST_FLAG]

    original = ds._merge_zero_shards

    def merge_zero_shards(*args, **kwargs):  # type: ignore[no-untyped-def]
        slices = original(*args, **kwargs)
        return [s.reshape(1) if torch.is_tensor(s) and s.dim() == 0 else s for s in slices]

    ds._merge_zero_shards = merge_zero_shards  # worker processes are forked and inherit the fix
    try:
        with checkpoint_loading(trust):
            ds.main(ds.parse_arguments())
    except CheckpointError as e:  # one line for the parent to show, not a traceback
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
