"""List the entries a config's checkpoints must hold, or check a checkpoint file against them.

    python -m workflows.inspect --config configs/tiny.yaml
    python -m workflows.inspect --config configs/tiny.yaml --checkpoint model.pt [--component model]

Prints `<component> <key> <shape>` a line (shape as d1xd2x...), built on the meta device: no weights or
memory needed. With --checkpoint, lists missing, unexpected and mis-shaped keys; exit 1 if any.
"""

import argparse
import sys

import torch

from sparsevar.backends import expected_entries
from workflows.config import ConfigError, load_config


def format_shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape) or "scalar"


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors by name; official files that wrap the weights (under `model`, `state_dict` or
    `trainer`) are unwrapped by the backend's loader, so accept those wrappers here too."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    return state


def compare(expected: dict[str, tuple[int, ...]], found: dict[str, torch.Tensor]) -> list[str]:
    """Problems, one line each: missing, unexpected, and shape mismatches."""
    problems = [f"missing {key} {format_shape(shape)}" for key, shape in expected.items() if key not in found]
    problems += [f"unexpected {key} {format_shape(tuple(t.shape))}" for key, t in found.items() if key not in expected]
    problems += [
        f"mis-shaped {key}: expected {format_shape(shape)}, found {format_shape(tuple(found[key].shape))}"
        for key, shape in expected.items() if key in found and tuple(found[key].shape) != shape
    ]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workflows.inspect", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--checkpoint", help="a checkpoint file to check against the expected entries")
    parser.add_argument("--component", help="which component the checkpoint holds (default: the only one, or "
                                            "the first listed)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    entries = expected_entries(cfg.model)
    if not args.checkpoint:
        for component, keys in entries.items():
            for key, shape in keys.items():
                print(f"{component} {key} {format_shape(shape)}")
        return 0
    component = args.component or next(iter(entries))
    if component not in entries:
        print(f"error: unknown component {component!r}; this config has {sorted(entries)}", file=sys.stderr)
        return 2
    try:
        found = load_state_dict(args.checkpoint)
    except (OSError, RuntimeError) as exc:
        print(f"error: cannot read checkpoint {args.checkpoint}: {exc}", file=sys.stderr)
        return 2
    problems = compare(entries[component], found)
    for line in problems:
        print(line)
    print(f"{args.checkpoint}: {len(entries[component])} expected {component} entries, "
          f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
