"""The domain's yardstick, as GenEval is for the real models: a small detector that finds the objects of a
picture (centre, shape, colour, fill) and checks everything a caption says: per named object its shape, colour,
fill and place (one of the nine regions), and the number of objects."""

import itertools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sparsevar.demo import scenes

SHIPPED = Path(__file__).parent / "weights" / "yardstick.safetensors"
SEEN = 64  # side at which the yardstick looks at a picture
GRID = 16  # side of its map of object centres: a cell is 1/16 of the picture
ATTRIBUTES = ("shape", "colour", "fill", "position")
CLASSES = {"shape": scenes.SHAPES, "colour": tuple(scenes.COLOURS), "fill": scenes.FILLS}
_HEADS = 1 + 2 + sum(len(c) for c in CLASSES.values())  # centre logit, offset in the cell, the attributes' logits
_PEAK = 0.5  # least centre probability of a detected object
_SIGMA = 1.0  # spread, in cells, of the centre heat map it learns
_MATCHED = 6  # most detections (the likeliest) a prompt's objects are matched against

Judge = Callable[[list[np.ndarray], list[str]], float]


@dataclass(frozen=True)
class Wanted:
    """What a caption says of one object; None where it says nothing (a position is one of scenes.REGIONS)."""

    shape: str | None = None
    colour: str | None = None
    fill: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class Found:
    """One detected object."""

    shape: str
    colour: str
    fill: str
    position: str
    cx: float
    cy: float


@dataclass
class Verdict:
    """Per attribute, whether each object that names it got it right; and whether the object count is right."""

    checks: dict[str, list[bool]] = field(default_factory=lambda: {a: [] for a in ATTRIBUTES})
    count: bool | None = None  # None: the prompt named no object

    @property
    def score(self) -> float:
        """Share of the checks passed, the count one of them; 1 when the prompt named nothing to check."""
        passed = [c for checks in self.checks.values() for c in checks] + ([] if self.count is None else [self.count])
        return sum(passed) / len(passed) if passed else 1.0


def pixels(images_BHWC: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 pictures as the tokenizer and the yardstick see them: (B, 3, H, W) in [-1, 1], on their device."""
    if isinstance(images_BHWC, np.ndarray):
        images_BHWC = torch.from_numpy(np.ascontiguousarray(images_BHWC))
    return images_BHWC.permute(0, 3, 1, 2).float() / 127.5 - 1


def parse(prompt: str) -> list[Wanted]:
    """The objects a prompt names, one per part joined by "and", in the captions' words; parts naming no shape,
    colour, fill or place are left out ("a photo of a cat" names nothing)."""
    objects = []
    for part in re.split(r"\band\b", prompt.lower()):
        words = set(re.findall(r"[a-z]+", part))
        vertical, horizontal = _first(("top", "bottom"), words), _first(("left", "right"), words)
        centre = _first(("centre", "center", "middle"), words)
        position = f"{vertical or ''} {horizontal or ''}".strip() or ("centre" if centre else None)
        wanted = Wanted(_first(scenes.SHAPES, words), _first(tuple(scenes.COLOURS), words),
                        _first(scenes.FILLS, words), position)
        if wanted != Wanted():
            objects.append(wanted)
    return objects


def _first(options: Sequence[str], words: set[str]) -> str | None:
    return next((o for o in options if o in words), None)


def described(scene: scenes.Scene) -> list[Wanted]:
    """Everything true of a scene's objects, place included: the yardstick's own accuracy is measured on it."""
    return [Wanted(s.shape, s.colour, s.fill, s.position()) for s in scene.shapes]


def verdict(wanted: list[Wanted], found: list[Found]) -> Verdict:
    """Checks of the prompt's objects against the detected ones (likeliest first), matched one to one as favourably
    as possible; a named object with no detection left fails all its checks."""
    result = Verdict(count=None if not wanted else len(found) == len(wanted))
    slots: list[Found | None] = [*found[:_MATCHED], *[None] * len(wanted)]
    best: list[tuple[str, bool]] = []
    for chosen in itertools.permutations(range(len(slots)), len(wanted)):
        checks = [(a, getattr(slots[j], a, None) == getattr(w, a))
                  for w, j in zip(wanted, chosen, strict=True) for a in ATTRIBUTES if getattr(w, a) is not None]
        if not best or sum(ok for _, ok in checks) > sum(ok for _, ok in best):
            best = checks
    for attribute, ok in best:
        result.checks[attribute].append(ok)
    return result


def targets(batch: Sequence[scenes.Scene], device: torch.device | str) -> dict[str, torch.Tensor]:
    """What the detector learns from real scenes, on its GRID x GRID map: a Gaussian heat map around every object
    centre (B, G, G), the centre's offset within its cell (B, 2, G, G, where `centres` is true), and every attribute
    at each cell inside an object (B, G, G, -1 elsewhere)."""
    table = scenes.ShapeTable(batch, device)
    x, y = scenes.grid(GRID, device)
    inside = table.masks(x, y)  # (B, S, G, G)
    gx, gy = table.cx * GRID, table.cy * GRID  # (B, S, 1, 1), in cells
    distance2 = (x * GRID - gx) ** 2 + (y * GRID - gy) ** 2
    heat = torch.where(table.present, torch.exp(-distance2 / (2 * _SIGMA**2)), 0.0).amax(1).float()
    centres = (x * GRID).floor() == gx.floor()
    centres = centres & ((y * GRID).floor() == gy.floor()) & table.present  # (B, S, G, G)
    offset = torch.stack([(gx - gx.floor()).expand_as(distance2), (gy - gy.floor()).expand_as(distance2)], 2)
    out = {"heat": heat, "centres": centres.any(1), "offset": (offset * centres[:, :, None]).sum(1).float()}
    labels = {"shape": table.kind.long(), "fill": table.fill.long(),
              "colour": torch.tensor([[list(scenes.COLOURS).index(s.colour) for s in scene.shapes] +
                                      [0] * (inside.shape[1] - len(scene.shapes)) for scene in batch],
                                     device=device)[..., None, None]}
    covered = inside | centres
    for name, label in labels.items():
        out[name] = torch.where(covered, label, -1).amax(1)  # shapes do not overlap: at most one covers a cell
    return out


class Yardstick(nn.Module):
    """Pictures (B, 3, H, W) in [-1, 1], seen at 64x64 -> a (B, 15, 16, 16) map: per cell, the logit that an
    object's centre lies there, the centre's offset in the cell and the logits of its shape, colour and fill.
    Dilated convolutions give every cell a view of the whole picture."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c_out, dilation, pool in ((width, 1, True), (width, 1, True), (2 * width, 1, False),
                                      (2 * width, 2, False), (2 * width, 4, False), (2 * width, 1, False)):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=dilation, dilation=dilation), nn.BatchNorm2d(c_out),
                       nn.ReLU()]
            layers += [nn.MaxPool2d(2)] if pool else []
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Conv2d(c_in, _HEADS, 1)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(F.interpolate(x_BCHW, size=(SEEN, SEEN), mode="area")))

    def loss(self, x_BCHW: torch.Tensor, batch: Sequence[scenes.Scene]) -> tuple[torch.Tensor, dict[str, float]]:
        """Heat-map BCE + offset L1 at the centres + each attribute's cross-entropy inside the objects."""
        out, want = self(x_BCHW), targets(batch, x_BCHW.device)
        heat = F.binary_cross_entropy_with_logits(out[:, 0], want["heat"])
        offset = (out[:, 1:3].sigmoid() - want["offset"]).abs().sum(1)[want["centres"]].mean()
        logits = self._attribute_logits(out)
        attributes = {n: F.cross_entropy(logits[n], want[n], ignore_index=-1) for n in CLASSES}
        accuracy = {n: float((logits[n].argmax(1) == want[n])[want[n] >= 0].float().mean()) for n in CLASSES}
        return 10 * heat + offset + sum(attributes.values()), accuracy

    @staticmethod
    def _attribute_logits(out: torch.Tensor) -> dict[str, torch.Tensor]:
        sizes = [len(c) for c in CLASSES.values()]
        return dict(zip(CLASSES, out[:, 3:].split(sizes, dim=1), strict=True))

    @torch.no_grad()
    def detect(self, x_BCHW: torch.Tensor) -> list[list[Found]]:
        """Per picture, its objects, likeliest first: local maxima (3x3) of the centre map above 0.5."""
        out = self(x_BCHW)
        heat = out[:, 0].sigmoid()
        peaks = (heat >= _PEAK) & (heat == F.max_pool2d(heat[:, None], 3, 1, 1)[:, 0])
        offset = out[:, 1:3].sigmoid()
        logits = self._attribute_logits(out)
        found: list[list[Found]] = [[] for _ in range(len(x_BCHW))]
        order = sorted(peaks.nonzero().tolist(), key=lambda bij: -float(heat[bij[0], bij[1], bij[2]]))
        for b, i, j in order:
            cx, cy = (j + float(offset[b, 0, i, j])) / GRID, (i + float(offset[b, 1, i, j])) / GRID
            names = {n: CLASSES[n][int(logits[n][b, :, i, j].argmax())] for n in CLASSES}
            found[b].append(Found(**names, position=scenes.region(cx, cy), cx=cx, cy=cy))
        return found

    def judge(self, x_BCHW: torch.Tensor, wanted: list[list[Wanted]]) -> list[Verdict]:
        """Per picture, the checks of what it should show against what the detector finds."""
        return [verdict(w, f) for w, f in zip(wanted, self.detect(x_BCHW), strict=True)]

    def score(self, x_BCHW: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Per picture, the share of what its prompt says that the detector finds (`Verdict.score`): (B,)."""
        return torch.tensor([v.score for v in self.judge(x_BCHW, [parse(p) for p in prompts])])


def accuracy(verdicts: list[Verdict]) -> dict[str, float | None]:
    """Per attribute, the share of the named objects that got it right (None where none named it); the share of
    pictures with the right count; "all found": the share that passed every check."""
    out: dict[str, float | None] = {}
    for attribute in ATTRIBUTES:
        checks = [c for v in verdicts for c in v.checks[attribute]]
        out[attribute] = sum(checks) / len(checks) if checks else None
    counted = [v.count for v in verdicts if v.count is not None]
    out["count"] = sum(counted) / len(counted) if counted else None
    out["all_found"] = sum(v.score == 1 for v in verdicts) / len(verdicts)
    return out


def load_yardstick(path: Path = SHIPPED) -> Yardstick:
    """The shipped yardstick (or another trained one), ready to score."""
    from safetensors.torch import load_file

    if not path.exists():
        raise FileNotFoundError(f"yardstick weights not found: {path}; train them with python -m workflows.train_demo")
    yardstick = Yardstick()
    yardstick.load_state_dict(load_file(path))
    return yardstick.eval().requires_grad_(False)


def demo_yardstick(backend: str | None, weights: str | None) -> Yardstick | None:
    """The yardstick, when a model config (its backend and weights) names the shipped demo model: it judges that
    model's domain only."""
    return load_yardstick() if backend == "tiny" and weights == "demo" else None


def demo_judge(model_cfg) -> Judge | None:
    """Mean yardstick score of pictures against their prompts, when the model is the shipped demo model."""
    yardstick = demo_yardstick(getattr(model_cfg, "backend", None), getattr(model_cfg, "weights", None))
    if yardstick is None:
        return None
    return lambda images, prompts: float(yardstick.score(pixels(np.stack(images)), prompts).mean())
