"""Why the demo model loses places and second objects: evidence from its captions, its text encoder and its pictures.

    python scripts/demo_probe.py [--config configs/tiny.yaml] [--per-region 8]

1. Captions: how often a training caption names an object's place.
2. Text side: a linear probe (least squares, trained on half the colours, tested on the rest) from the text
   encoder's pooled output, the AdaLN condition, to the named region: does the condition carry the place?
3. Pictures (dense, the job's sampling): for prompts naming each of the nine regions, the share drawn there and the
   mean detected centre; for unplaced prompts, where the model puts the object; for two-object prompts, how many
   objects the yardstick finds.
"""

import argparse
import collections
import itertools
import statistics

import numpy as np
import torch

from sparsevar.backends import build_backend
from sparsevar.demo import scenes
from sparsevar.demo.yardstick import load_yardstick, parse, pixels
from sparsevar.generate import Request, generate
from workflows.config import load_config


def caption_places(n: int) -> dict[str, float]:
    """Share of objects whose place their training caption names, over the first n training scenes."""
    named, total = collections.Counter(), collections.Counter()
    for seed in range(n):
        scene, caption = scenes.scene_from_seed(seed)
        for wanted in parse(caption):
            key = f"{len(scene.shapes)}-object scenes"
            total[key] += 1
            named[key] += wanted.position is not None
    return {k: named[k] / total[k] for k in sorted(total)}


def text_probe(backend) -> float:
    """Held-out accuracy of a linear map from the pooled text condition to the region a caption names."""
    model = backend.model
    rows = []
    for shape, colour, fill, region in itertools.product(scenes.SHAPES, scenes.COLOURS, scenes.FILLS, scenes.REGIONS):
        where = "in the centre" if region == "centre" else f"at the {region}"
        rows.append((f"a {fill} {colour} {shape} {where}", colour, scenes.REGIONS.index(region)))
    ids, mask = backend.tokenizer([r[0] for r in rows], "cpu")
    with torch.no_grad():
        cond = model.transformer.condition(model.text_encoder(ids, mask), mask)[:, 0].double()
    features = torch.cat([cond, torch.ones(len(rows), 1, dtype=torch.float64)], 1)
    labels = torch.tensor([r[2] for r in rows])
    train = torch.tensor([r[1] in ("red", "green", "blue") for r in rows])
    targets = torch.nn.functional.one_hot(labels, len(scenes.REGIONS)).double()
    weights = torch.linalg.lstsq(features[train], targets[train], rcond=None).solution
    return float(((features[~train] @ weights).argmax(1) == labels[~train]).float().mean())


def pictures(backend, cfg, per_region: int) -> None:
    yardstick = load_yardstick()
    dense = cfg.sparsevar.model_copy(update={"enabled": False})
    colours = itertools.cycle(scenes.COLOURS)
    print("\nregion named | drawn there | mean detected centre (x, y) | objects found (count: pictures)")
    right = []
    for region in scenes.REGIONS:
        where = "in the centre" if region == "centre" else f"at the {region}"
        prompts = [f"a {next(colours)} solid circle {where}" for _ in range(per_region)]
        found = _detect(backend, yardstick, dense, prompts)
        centres = [(f[0].cx, f[0].cy) for f in found if f]
        right += [bool(f) and f[0].position == region for f in found]
        mean = np.mean(centres, axis=0) if centres else (float("nan"),) * 2
        counts = collections.Counter(len(f) for f in found)
        print(f"{region:12} | {statistics.mean(right[-per_region:]):.2f} | ({mean[0]:.2f}, {mean[1]:.2f}) | "
              f"{dict(sorted(counts.items()))}")
    print(f"all regions: drawn where named in {statistics.mean(right):.2f} of the pictures")
    unplaced = _detect(backend, yardstick, dense, [f"a {next(colours)} solid circle" for _ in range(4 * per_region)])
    drawn = collections.Counter(f[0].position for f in unplaced if f)
    print(f"no place named: drawn at {dict(drawn.most_common())}")
    pairs = [f"a red solid {a} and a blue striped {b}" for a, b in itertools.product(scenes.SHAPES, repeat=2)]
    found = _detect(backend, yardstick, dense, (pairs * per_region)[: 2 * per_region])
    print(f"two objects asked: objects found {dict(sorted(collections.Counter(len(f) for f in found).items()))}")


def _detect(backend, yardstick, sv, prompts: list[str]):
    results = generate(backend, [Request(p, seed=i) for i, p in enumerate(prompts)], sv)
    return yardstick.detect(pixels(np.stack([r.pixels_HWC for r in results])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--per-region", type=int, default=8, help="pictures per named region")
    args = parser.parse_args()
    cfg = load_config(args.config, ["runtime.device=cpu"])
    backend = build_backend(cfg.model, cfg.sampling, "cpu")
    print("captions naming the place of an object:", caption_places(4000))
    print(f"text probe, pooled condition -> named region, unseen colours: {text_probe(backend):.3f} (chance 0.111)")
    pictures(backend, cfg, args.per_region)


if __name__ == "__main__":
    main()
