"""Train the demo model: `python -m workflows.train_demo --out DIR` (resumable: run it again to continue).

Phases, in order: tokenizer (encoder and decoder), decoder (fine-tuned alone on the frozen codes),
transformer, yardstick. Writes DIR/demo.safetensors (the tiny backend's weights, rewritten at every
transformer checkpoint and at the end), DIR/yardstick.safetensors, DIR/log.jsonl and DIR/summary.json. Ship
them by copying the two .safetensors files to sparsevar/demo/weights/.

Fine-tuning a trained model: the recipe's `init` names its demo.safetensors (`demo`: the shipped one) and
`--phases tokenizer,transformer` fits a new encoder to its frozen decoder (the weights hold none), then trains its
text encoder and transformer on; `layout_stages` and `full_every` spend most steps on the first stages alone.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from sparsevar.backends import resolve_device
from sparsevar.demo.train import (
    Runtime,
    TrainConfig,
    export_weights,
    finetune_decoder,
    tokenizer_psnr,
    train_tokenizer,
    train_transformer,
    train_yardstick,
    yardstick_accuracy,
)


def trained_steps(checkpoint: Path) -> int:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["step"] if checkpoint.exists() else 0


def recipe(saved: Path, overrides: object, steps: object, seed: int | None, held_out: int | None) -> TrainConfig:
    """The run's recipe: the one DIR was trained with (DIR/config.json) or the defaults, with the command line's
    changes on top, so that resuming without repeating --recipe continues the same schedule."""
    base = TrainConfig.model_validate_json(saved.read_text()) if saved.exists() else TrainConfig()
    fields = base.model_dump()
    if not isinstance(overrides, dict) or not isinstance(steps, dict):
        raise ValueError("--recipe and --steps take a JSON object, e.g. '{\"transformer\": {\"batch\": 64}}'")
    changes = [*overrides.items(), *((k, {"steps": v}) for k, v in steps.items()),
               *((k, v) for k, v in (("seed", seed), ("held_out", held_out)) if v is not None)]
    for key, value in changes:
        if key not in fields:
            raise ValueError(f"--recipe/--steps: unknown field {key!r}; the recipe has {sorted(fields)}")
        if isinstance(fields[key], dict) != isinstance(value, dict):
            raise ValueError(f"--recipe: {key} takes {'an object' if isinstance(fields[key], dict) else 'a value'}, "
                             f"not {value!r}")
        fields[key] = {**fields[key], **value} if isinstance(value, dict) else value
    return TrainConfig(**fields)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workflows.train_demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for checkpoints, logs and weights")
    parser.add_argument("--seed", type=int, help="the recipe's seed (default 0)")
    parser.add_argument("--phases", default="tokenizer,decoder,transformer,yardstick",
                        help="phases to run now, comma-separated; later phases need the earlier ones' files")
    parser.add_argument("--steps", type=json.loads, default={},
                        help='steps per phase, e.g. \'{"tokenizer": 10, "transformer": 10}\' for a smoke run')
    parser.add_argument("--recipe", type=json.loads, default={},
                        help='other TrainConfig fields, e.g. \'{"transformer": {"batch": 64, "steps": 3000}}\'')
    parser.add_argument("--held-out", type=int, help="held-out scenes for the tokenizer's PSNR (default 64)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--store", choices=("fp32", "fp16"), default="fp32",
                        help="precision of DIR/demo.safetensors (fp16: half the size, loaded back to fp32)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, _ = resolve_device(args.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32: these small models train as well and faster
    rt = Runtime(device, torch.float16 if args.store == "fp16" else torch.float32)
    try:
        cfg = recipe(args.out / "config.json", args.recipe, args.steps, args.seed, args.held_out)
    except (ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
        parser.error(str(exc))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.json").write_text(cfg.model_dump_json(indent=2))
    phases = args.phases.split(",")
    began = time.time()
    summary_path = args.out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    if {"tokenizer", "decoder", "transformer"} & set(phases):
        encoder, decoder = train_tokenizer(cfg, args.out, rt)
        summary["tokenizer_psnr_db"] = round(tokenizer_psnr(cfg, encoder, decoder), 2)
        if "decoder" in phases or (args.out / "decoder.pt").exists():
            decoder = finetune_decoder(cfg, args.out, rt, encoder, decoder)
            summary["decoder_psnr_db"] = round(tokenizer_psnr(cfg, encoder, decoder), 2)
        print(f"tokenizer: held-out PSNR {summary.get('decoder_psnr_db', summary['tokenizer_psnr_db'])} dB")
    if "transformer" in phases or ("decoder" in phases and trained_steps(args.out / "transformer.pt")
                                   >= cfg.transformer.steps):
        model = train_transformer(cfg, args.out, rt, encoder, decoder)
        model.decoder.load_state_dict(decoder.state_dict())
        export_weights(model, args.out / "demo.safetensors", rt.store)
    if "yardstick" in phases:
        yardstick = train_yardstick(cfg, args.out, rt)
        export_weights(yardstick, args.out / "yardstick.safetensors")
        shares = yardstick_accuracy(yardstick, 4 * cfg.held_out, cfg.model.image_side)
        summary["yardstick_held_out"] = {k: None if v is None else round(v, 4) for k, v in shares.items()}
        print(f"yardstick on {4 * cfg.held_out} held-out scenes: {summary['yardstick_held_out']}")
    summary[f"seconds_{'+'.join(phases)}"] = round(time.time() - began, 1)
    summary_path.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
