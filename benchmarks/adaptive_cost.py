"""Which normalize mode lets adaptive τ track a target better, measured on a clock that machine load cannot move.

    python -m benchmarks.adaptive_cost --config configs/tiny-random.yaml --prompts configs/prompts/sample.jsonl

The wall-clock benchmark (benchmarks.adaptive) mixes two things: how predictable a batch's cost is at a given
τ, which depends on the mode, and the noise of a shared machine, which does not. This one keeps the first
only: the real model selects tokens for real prompts, but a batch's "latency" is the spec's cost model
(sparsevar.flops) on its padded kept counts (each stage runs the batch's largest kept count for every image),
at 1 GFLOP per ms. Per mode it calibrates on that clock, then drives the real controller at 1.2x and 1.5x
dense throughput and prints the same figures as the wall-clock benchmark.
"""

import argparse
import statistics
import sys
from dataclasses import replace

from benchmarks.adaptive import report
from sparsevar.adaptive import Controller, Curve
from sparsevar.backend import Backend
from sparsevar.backends import build_backend
from sparsevar.config import SparseVARConfig
from sparsevar.flops import generation_flops
from sparsevar.generate import ImageResult, Request, generate
from workflows.calibrate import read_prompt_sample
from workflows.config import load_config


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.adaptive_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tiny-random.yaml")
    parser.add_argument("--prompts", default="configs/prompts/sample.jsonl", help="cycled with new seeds as needed")
    parser.add_argument("--batches", type=int, default=16, help="batches per run (default 16)")
    parser.add_argument("--settle", type=int, default=3, help="batches left out of the settled figures (default 3)")
    parser.add_argument("--factors", default="1.2,1.5", help="targets as multiples of dense throughput")
    parser.add_argument("--modes", default="minmax,quantile", help="sparsevar.normalize modes to compare")
    parser.add_argument("--taus", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0", help="calibration grid")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser.parse_args(argv)


def cost_ms(backend: Backend, results: list[ImageResult], dense: bool = False) -> float:
    """The batch's cost-model time: every stage padded to the batch's largest kept count, 1 GFLOP per ms."""
    padded = [replace(stage, kept=max(r.stages[k].kept for r in results)) for k, stage in enumerate(results[0].stages)]
    flops = generation_flops(padded, backend.block_params, backend.dim, backend.depth, dense)
    return len(results) * flops / 1e9


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    size = cfg.ray.batch_size
    sample = read_prompt_sample(args.prompts, args.batches * size)
    requests = [Request(sample[i % len(sample)].prompt, i, sample[i % len(sample)].negative_prompt)
                for i in range(args.batches * size)]
    batches = [requests[i:i + size] for i in range(0, len(requests), size)]
    calibration_batches = batches[:2]
    backend = build_backend(cfg.model, cfg.sampling, cfg.runtime.device, cfg.runtime.dtype)
    dense_sv = cfg.sparsevar.model_copy(update={"enabled": False})
    dense_ms = statistics.median(cost_ms(backend, generate(backend, b, dense_sv), dense=True) / len(b)
                                 for b in calibration_batches)
    print(f"dense: {1000 / dense_ms:.2f} images/s on the cost-model clock (1 GFLOP per ms)")
    print(f"{'mode':>8} {'factor':>7} {'target':>8} {'achieved':>9} {'settled':>8} {'bias':>7} {'spread':>7} "
          f"{'mean τ':>7} {'std τ':>6}")
    taus = [float(t) for t in args.taus.split(",")]
    for mode in args.modes.split(","):
        def at(tau: float, mode: str = mode) -> SparseVARConfig:
            return cfg.sparsevar.model_copy(update={"enabled": True, "normalize": mode, "tau": tau})

        curve = Curve.fit(taus, [statistics.median(cost_ms(backend, generate(backend, b, at(tau))) / len(b)
                                                   for b in calibration_batches) for tau in taus])
        for factor in (float(f) for f in args.factors.split(",")):
            controller = Controller(curve, dense_ms / factor)
            log = []
            for batch in batches:
                tau = controller.next_tau()
                ms = cost_ms(backend, generate(backend, batch, at(tau)))
                controller.observe(tau, ms, len(batch))
                log.append((tau, ms, len(batch)))
            print(report(mode, factor, 1000 * factor / dense_ms, log, args.settle), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
