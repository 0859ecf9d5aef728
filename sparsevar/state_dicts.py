"""Read checkpoint files into state dicts and check them against the entries a model expects.

Shared by backends (which load strictly) and `workflows.inspect` (which reports), so a file that inspect
passes is one the backend loads. Files are read with `weights_only=True`, memory-mapped where possible.
"""

import json
from pathlib import Path

import torch

WRAPPERS = ("model", "state_dict", "module", "vae")  # keys under which official files nest their weights
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class CheckpointMismatch(ValueError):
    """A checkpoint's entries are not the ones the configured model needs."""


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:  # files in the legacy (non-zip) format cannot be memory-mapped
        if "mmap" not in str(exc):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dict(path: str, wrapper: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors by name from a .pth/.pt/.bin/.safetensors file or a folder of shards with an index file.

    `wrapper` unwraps one known key (e.g. 'vae'); without it the first of WRAPPERS found is unwrapped.
    Raises FileNotFoundError or CheckpointMismatch naming the file and what was expected.
    """
    source = Path(path)
    if source.is_dir():
        index = next((source / name for name in INDEX_FILES if (source / name).is_file()), None)
        if index is None:
            raise FileNotFoundError(f"checkpoint folder {path} has no shard index ({' or '.join(INDEX_FILES)})")
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(_read_file(source / shard))
        return state
    if not source.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        state = _read_file(source)
    except Exception as exc:  # noqa: BLE001 - torch and safetensors raise many types for a bad file
        raise CheckpointMismatch(f"cannot read checkpoint {path} ({source.stat().st_size} bytes): "
                                 f"{type(exc).__name__}: {exc}; is the file complete (not truncated)?") from exc
    if not isinstance(state, dict):
        raise CheckpointMismatch(f"checkpoint {path} holds a {type(state).__name__}, not a dict of tensors")
    for key in (wrapper,) if wrapper else WRAPPERS:
        if isinstance(state.get(key), dict):
            return state[key]
    if wrapper:
        raise CheckpointMismatch(f"checkpoint {path} has no '{wrapper}' entry (top-level keys: {sorted(state)[:8]})")
    return state


def format_shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape) or "scalar"


def compare(expected: dict[str, tuple[int, ...]], found: dict[str, torch.Tensor]) -> list[str]:
    """Problems, one line each: missing, unexpected, and shape mismatches."""
    problems = [f"missing {key} {format_shape(shape)}" for key, shape in expected.items() if key not in found]
    problems += [f"unexpected {key} {format_shape(tuple(t.shape))}" for key, t in found.items() if key not in expected]
    problems += [
        f"mis-shaped {key}: expected {format_shape(shape)}, found {format_shape(tuple(found[key].shape))}"
        for key, shape in expected.items() if key in found and tuple(found[key].shape) != shape
    ]
    return problems


def check_entries(expected: dict[str, tuple[int, ...]], found: dict[str, torch.Tensor], path: str,
                  component: str) -> None:
    """Raise CheckpointMismatch listing (the first few) problems when `found` is not exactly `expected`."""
    problems = compare(expected, found)
    if problems:
        shown = "\n  ".join(problems[:12]) + (f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else "")
        raise CheckpointMismatch(f"{path} does not hold the {component} this config describes "
                                 f"({len(problems)} problem(s); check the config's architecture fields):\n  {shown}")
