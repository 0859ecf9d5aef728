"""List the entries a config's checkpoints must hold, or check a checkpoint file against them.

    python -m workflows.inspect --config configs/tiny.yaml
    python -m workflows.inspect --config configs/tiny.yaml --checkpoint model.pt [--component model]
    python -m workflows.inspect --config configs/infinity-2b.yaml \
        --checkpoint hf://FoundationVision/Infinity/infinity_vae_d32reg.pth --component vae

Prints `<component> <key> <shape>` a line (shape as d1xd2x...), built on the meta device: no weights or
memory needed. With --checkpoint (a file, a folder of shards with an index, or an s3:// or hf:// URI fetched into
the node's cache), lists missing, unexpected and mis-shaped keys; exit 1 if any. Files that nest their weights
under `model`, `state_dict`, `module` or `vae` (Infinity's VAE) are unwrapped.
"""

import argparse
import sys

from sparsevar.backends import expected_entries
from sparsevar.state_dicts import CheckpointMismatch, compare, format_shape, read_state_dict
from storage.checkpoints import CheckpointError, fetch_checkpoint
from workflows.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workflows.inspect", description=__doc__.split("\n\n")[0])
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
        found = read_state_dict(fetch_checkpoint(args.checkpoint))
    except (OSError, CheckpointError, CheckpointMismatch) as exc:
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
