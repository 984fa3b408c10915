"""Turn externally released pickle-based weights (a torch `.bin` / `.pt`) into safetensors, once.

    convert_to_safetensors(src, dst) -> Path   {name: tensor} of `src` written to `dst`
        src  a torch file (read with torch.load(weights_only=True) through
             `encoder3d.read_state_dict`, which also unwraps `state_dict` / `model` entries and
             strips `module.` prefixes) or a .safetensors file
        dst  the .safetensors file to write (atomically: a temporary sibling, then renamed);
             shared tensors are stored as separate contiguous copies

Use it on weights released only as `.bin` (e.g. M3D-CLIP's `pytorch_model.bin`, issue 9); then
point `model.encoder3d.weights` (or `model.slice_encoder.weights`) at the `.safetensors` file. A
file that weights_only refuses (arbitrary pickled objects) is one DataError line naming it;
nothing else is ever unpickled. The `medvlm3d convert SRC DST` verb calls this function.
"""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import save_file

from medvlm3d.data.errors import DataError
from medvlm3d.io import atomic_file
from medvlm3d.model.encoder3d import read_state_dict


def convert_to_safetensors(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Read `src` (weights_only) and write its tensors to the safetensors file `dst`; returns `dst`."""
    source, out = Path(src), Path(dst)
    if not source.is_file():
        raise DataError(f"{source}: no such weights file")
    if out.suffix != ".safetensors":
        raise DataError(f"{out}: the output must end in .safetensors")
    if out.resolve() == source.resolve():
        raise DataError(f"{out}: the output must differ from the input {source}")
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in read_state_dict(source, "weights").items()}
    with atomic_file(out) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "converted_from": source.name})
    return out


__all__ = ["convert_to_safetensors"]
