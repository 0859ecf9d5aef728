"""Choose SparseVAR's score block s for a model: fidelity to the dense image for every candidate block.

    python scripts/score_block_sweep.py --config configs/hart-0.7b.yaml --prompts configs/prompts/sample.jsonl
    python scripts/score_block_sweep.py --config CONFIG --blocks 4 8 12 --set sparsevar.normalize=quantile

For each prompt (seed = its index) the dense image is generated once, then the SparseVAR image for every s, all
else as configured. Prints per s the mean PSNR against dense, the kept ratio of the sparse stages and the
ideal (FLOPs) speed-up, and the s of highest PSNR. With `normalize: quantile` every s keeps the same number of
tokens, so the comparison is at equal cost. Meaningful only with trained weights: with random ones every block's
change is noise. `--json` also writes the table.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsevar.backends import build_backend  # noqa: E402
from sparsevar.flops import flops_ratio  # noqa: E402
from sparsevar.generate import Request, first_sparse_stage, generate  # noqa: E402
from storage.checkpoints import localize_checkpoints  # noqa: E402
from workflows.config import load_config  # noqa: E402


def read_prompts(path: str) -> list[str]:
    """Prompts of a JSONL file (its `prompt` fields) or a text file (one a line)."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    return [json.loads(line)["prompt"] for line in lines] if path.endswith(".jsonl") else lines


def psnr(a_HWC: np.ndarray, b_HWC: np.ndarray) -> float:
    mse = float(np.mean((a_HWC.astype(np.float64) - b_HWC.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--prompts", default="configs/prompts/sample.jsonl", help="JSONL or one prompt a line")
    parser.add_argument("--limit", type=int, default=16, help="prompts to use")
    parser.add_argument("--blocks", type=int, nargs="+", help="candidate s (default: every block)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", help="also write the table to this file")
    args = parser.parse_args(argv)

    cfg = load_config(args.config, args.overrides)
    backend = build_backend(localize_checkpoints(cfg.model), cfg.sampling, cfg.runtime.device, cfg.runtime.dtype)
    prompts = read_prompts(args.prompts)[: args.limit]
    requests = [Request(p, seed=i) for i, p in enumerate(prompts)]
    sv = cfg.sparsevar.model_copy(update={"enabled": True})
    first = first_sparse_stage(sv)
    dense = [generate(backend, [r], sv.model_copy(update={"enabled": False}))[0] for r in requests]
    rows = []
    for s in args.blocks or range(1, backend.depth + 1):
        sparse = [generate(backend, [r], sv.model_copy(update={"score_block": s}))[0] for r in requests]
        late = [st for img in sparse for st in img.stages if st.stage >= first]
        fidelity = [min(psnr(d.pixels_HWC, x.pixels_HWC), 99.0) for d, x in zip(dense, sparse, strict=True)]
        rows.append({
            "score_block": s,
            "psnr_db": statistics.mean(fidelity),
            "kept_ratio": sum(st.kept for st in late) / sum(st.tokens for st in late),
            "flops_ratio": statistics.mean(flops_ratio(img.stages, backend.block_params, backend.dim, backend.depth)
                                           for img in sparse),
        })
        print(f"s={s:3d}  PSNR vs dense {rows[-1]['psnr_db']:6.2f} dB  kept {rows[-1]['kept_ratio']:.3f}  "
              f"ideal speed-up {rows[-1]['flops_ratio']:.2f}x", flush=True)
    best = max(rows, key=lambda row: row["psnr_db"])
    print(f"highest fidelity: s = {best['score_block']} ({len(requests)} prompts, τ = {sv.tau}, "
          f"P = {sv.start_stage}, normalize = {sv.normalize})")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": args.config, "sparsevar": sv.model_dump(), "rows": rows},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
