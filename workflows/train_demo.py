"""Train the demo model: `python -m workflows.train_demo --out DIR` (resumable: run it again to continue).

Phases, in order: tokenizer (encoder and decoder), decoder (fine-tuned alone on the frozen codes),
transformer, yardstick. Writes DIR/demo.safetensors (the tiny backend's weights, once the transformer is
trained), DIR/yardstick.safetensors, DIR/log.jsonl and DIR/summary.json. Ship them by copying the two
.safetensors files to sparsevar/demo/weights/.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from sparsevar.demo.train import (
    TrainConfig,
    finetune_decoder,
    tokenizer_psnr,
    train_tokenizer,
    train_transformer,
    train_yardstick,
)


def trained_steps(checkpoint: Path) -> int:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["step"] if checkpoint.exists() else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for checkpoints, logs and weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--phases", default="tokenizer,decoder,transformer,yardstick",
                        help="phases to run now, comma-separated; later phases need the earlier ones' files")
    parser.add_argument("--steps", type=json.loads, default={},
                        help='steps per phase, e.g. \'{"tokenizer": 10, "transformer": 10}\' for a smoke run')
    parser.add_argument("--held-out", type=int, default=64, help="held-out scenes for the tokenizer's PSNR")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(seed=args.seed, held_out=args.held_out)
    cfg = cfg.model_copy(update={k: getattr(cfg, k).model_copy(update={"steps": v}) for k, v in args.steps.items()})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.json").write_text(cfg.model_dump_json(indent=2))
    phases = args.phases.split(",")
    began = time.time()
    summary_path = args.out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    if {"tokenizer", "decoder", "transformer"} & set(phases):
        encoder, decoder = train_tokenizer(cfg, args.out)
        summary["tokenizer_psnr_db"] = round(tokenizer_psnr(cfg, encoder, decoder), 2)
        if "decoder" in phases or (args.out / "decoder.pt").exists():
            decoder = finetune_decoder(cfg, args.out, encoder, decoder)
            summary["decoder_psnr_db"] = round(tokenizer_psnr(cfg, encoder, decoder), 2)
        print(f"tokenizer: held-out PSNR {summary.get('decoder_psnr_db', summary['tokenizer_psnr_db'])} dB")
    if "transformer" in phases or ("decoder" in phases and trained_steps(args.out / "transformer.pt")
                                   >= cfg.transformer.steps):
        model = train_transformer(cfg, args.out, encoder, decoder)
        model.decoder.load_state_dict(decoder.state_dict())
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out / "demo.safetensors")
    if "yardstick" in phases:
        yardstick = train_yardstick(cfg, args.out)
        save_file(yardstick.state_dict(), args.out / "yardstick.safetensors")
    summary[f"seconds_{'+'.join(phases)}"] = round(time.time() - began, 1)
    summary_path.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
