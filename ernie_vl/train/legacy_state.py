"""Convert a pickle ``train_state.pt`` of earlier versions into ``train_state.safetensors``.

``python -m ernie_vl.train.legacy_state RUN_DIR``. The old file is read with
``torch.load(weights_only=True)``: PyTorch's restricted unpickler, which builds tensors and
plain containers, plus only the numpy globals allow-listed here (the arrays and generators of
numpy's RNG state), and raises on any other global, so a crafted file is refused rather than
run. Use it for run folders you wrote yourself; the state is then saved in the new format and
the old file renamed to ``train_state.pt.converted``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ernie_vl.train import checkpointing as ckpt


def _allowed_globals() -> list[Any]:
    """numpy's array reconstruction, dtypes and RNG constructors: all a training state pickles besides torch's own."""
    import numpy.random._pickle as np_pickle

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    allowed: list[Any] = [_reconstruct, np.ndarray, np.dtype, np.random.MT19937, np.random.RandomState,
                          np_pickle.__randomstate_ctor,
                          np_pickle.__bit_generator_ctor]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return allowed


def convert_legacy_state(directory: str | os.PathLike) -> Path:
    """Read ``directory/train_state.pt`` with the restricted unpickler and write ``train_state.safetensors``."""
    directory = Path(directory)
    legacy = directory / ckpt.LEGACY_CHECKPOINT_NAME
    if not legacy.is_file():
        raise FileNotFoundError(f"no {ckpt.LEGACY_CHECKPOINT_NAME} in {str(directory)!r} to convert")
    if (directory / ckpt.CHECKPOINT_NAME).exists():
        raise ValueError(f"{str(directory)!r} already holds {ckpt.CHECKPOINT_NAME}; nothing to convert")
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            state = torch.load(legacy, map_location="cpu", weights_only=True)
    except Exception as err:  # an unpickling error names the refused global
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = next((line for line in lines if "global" in line.lower() or "but got" in line), lines[0] if lines else "")
        raise ValueError(f"{str(legacy)!r} was refused by the restricted unpickler, so it was not converted "
                         f"({type(err).__name__}: {reason})") from None
    if not isinstance(state, dict) or "step" not in state or "model" not in state:
        raise ValueError(f"{str(legacy)!r} is not an ernie-vl training state (no step / model)")
    path = ckpt.save_training_state(directory, state)
    os.replace(legacy, legacy.with_name(legacy.name + ".converted"))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ernie_vl.train.legacy_state", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="run folder holding the old train_state.pt")
    args = parser.parse_args(argv)
    try:
        path = convert_legacy_state(args.run_dir)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}; resume with --resume")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
