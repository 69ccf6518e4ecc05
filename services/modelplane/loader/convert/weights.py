"""PyTorch pickled weights (*.bin, *.pt, *.pth), read safely.

A pickle is a program: unpickling one can run any code its author chose. These files are read
only with `torch.load(weights_only=True)`, whose unpickler builds tensors and plain containers and
refuses every other global, and are rewritten as safetensors before transformers sees the
model, so no other code path ever unpickles them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


class UnsafeWeights(Exception):
    pass


def as_safetensors(source: Path, work: Path) -> Path:
    """A copy of the Hugging Face directory `source` whose pickled weights are safetensors."""
    import torch  # noqa: PLC0415
    from safetensors.torch import save_file  # noqa: PLC0415

    state: dict[str, torch.Tensor] = {}
    for path in sorted(p for p in source.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file()):
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - every failure to unpickle safely is a refusal
            raise UnsafeWeights(
                f"{path.name} is not plain weights: loading it with weights_only=True was refused "
                f"({_first_line(error)}). A pickle that names other code could run it, so modelplane will not "
                "open it. Save the model with save_pretrained(safe_serialization=True) and ship the .safetensors "
                "files instead."
            ) from None
        if isinstance(loaded, dict) and "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
            loaded = loaded["state_dict"]
        if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            raise UnsafeWeights(f"{path.name} holds no state dict of tensors; it cannot be served as model weights.")
        state.update(loaded)
    work.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and path.suffix not in PICKLE_SUFFIXES:
            shutil.copyfile(path, work / path.name)
        elif path.is_dir():
            shutil.copytree(path, work / path.name)
    # Tied weights share storage; safetensors wants each tensor once and contiguous.
    save_file({name: tensor.contiguous().clone() for name, tensor in state.items()}, str(work / "model.safetensors"))
    return work


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return next(
        (line for line in lines if "Unsupported global" in line or "GLOBAL" in line), lines[0] if lines else ""
    )[:300]
