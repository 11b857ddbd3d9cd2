"""Run DeepSpeed's ``ds_to_universal`` converter with one fix for scalar (0-dim) parameters.

For ZeRO-1/2 the converter reshapes each parameter's merged fragments to the parameter's shape and then
concatenates them along dim 0, which fails for a 0-dim parameter such as the CLIP temperature ("zero-dimensional
tensor cannot be concatenated"). Here such fragments are kept 1-element 1-d instead; DeepSpeed's universal loader
flattens every parameter before slicing out a rank's fragment, so it loads them unchanged. Everything else is
DeepSpeed's own code, run as ``python -m mmt.ckpt.ds_universal_entry <ds_to_universal arguments>``.
"""

from __future__ import annotations

import torch


def main() -> None:
    from deepspeed.checkpoint import ds_to_universal as ds

    original = ds._merge_zero_shards

    def merge_zero_shards(*args, **kwargs):  # type: ignore[no-untyped-def]
        slices = original(*args, **kwargs)
        return [s.reshape(1) if torch.is_tensor(s) and s.dim() == 0 else s for s in slices]

    ds._merge_zero_shards = merge_zero_shards  # worker processes are forked and inherit the fix
    ds.main(ds.parse_arguments())


if __name__ == "__main__":
    main()
