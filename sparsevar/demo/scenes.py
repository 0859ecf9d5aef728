"""Procedural captioned scenes: smooth gradient backgrounds, one or two sharp-edged shapes, fine textures.

Exactly the structure SparseVAR exploits: most of a picture is low-frequency, detail sits on edges and fills.
Every scene is a pure function of its seed.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 205, 35),
    "purple": (135, 55, 175),
    "orange": (245, 135, 25),
}
FILLS = ("solid", "striped", "checkered")
# The nine places a caption names: a third of the side each way, the middle band 0.38-0.62.
REGIONS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
SUPERSAMPLE = 2
RENDER_CHUNK = 16  # scenes rendered together: on one CPU core, 64 at once run 3x slower a scene than 16
HELD_OUT_SEED = 10**9  # training draws seeds below this; evaluation captions held-out scenes from here up


@dataclass(frozen=True)
class Shape:
    shape: str
    colour: str
    fill: str
    cx: float  # centre, in [0, 1] of the width
    cy: float  # centre, in [0, 1] of the height
    radius: float  # in [0, 1] of the side
    angle: float  # stripe direction, radians
    period: float  # texture period, in [0, 1] of the side

    def position(self) -> str:
        return region(self.cx, self.cy)


def region(cx: float, cy: float) -> str:
    """The named place (one of REGIONS) of a centre in [0, 1]^2: what captions say and the yardstick checks."""
    vertical = "top" if cy < 0.38 else "bottom" if cy > 0.62 else ""
    horizontal = "left" if cx < 0.38 else "right" if cx > 0.62 else ""
    return f"{vertical} {horizontal}".strip() or "centre"


@dataclass(frozen=True)
class Scene:
    background: tuple[tuple[int, int, int], tuple[int, int, int]]
    direction: float  # gradient direction, radians
    shapes: tuple[Shape, ...]


def sample_scene(rng: np.random.Generator) -> Scene:
    """One or two shapes of random kind, colour, fill, size and place on a muted two-colour gradient."""
    background = tuple(tuple(int(v) for v in rng.integers(60, 200) + rng.integers(-35, 36, size=3)) for _ in "ab")
    count = 1 if rng.random() < 0.6 else 2
    shapes, centres = [], []
    for _ in range(count):
        for _attempt in range(20):
            radius = rng.uniform(0.14, 0.3) if count == 1 else rng.uniform(0.12, 0.2)
            cx, cy = rng.uniform(radius, 1 - radius, size=2)
            if all(np.hypot(cx - x, cy - y) > radius + r for x, y, r in centres):
                break
        centres.append((cx, cy, radius))
        shapes.append(
            Shape(
                shape=str(rng.choice(SHAPES)),
                colour=str(rng.choice(list(COLOURS))),
                fill=str(rng.choice(FILLS)),
                cx=float(cx),
                cy=float(cy),
                radius=float(radius),
                angle=float(rng.choice([0.0, np.pi / 2, np.pi / 4, -np.pi / 4])),
                period=float(rng.uniform(0.08, 0.14)),
            )
        )
    return Scene(background, float(rng.uniform(0, 2 * np.pi)), tuple(shapes))  # type: ignore[arg-type]


class ShapeTable:
    """The shapes of a batch of scenes as (B, S, 1, 1) float64 tensors, S the most shapes a scene has (absent ones
    masked out), so that every scene of a batch renders in the same few tensor operations, on any device."""

    FIELDS = ("kind", "fill", "cx", "cy", "radius", "cos", "sin", "period", "present")

    def __init__(self, batch: Sequence[Scene], device: torch.device | str = "cpu") -> None:
        slots = max(len(scene.shapes) for scene in batch)
        absent = (0, 0, 0.5, 0.5, 0.0, 1.0, 0.0, 1.0, 0.0)
        rows = [[(SHAPES.index(s.shape), FILLS.index(s.fill), s.cx, s.cy, s.radius, np.cos(s.angle), np.sin(s.angle),
                  s.period, 1.0) for s in scene.shapes] + [absent] * (slots - len(scene.shapes)) for scene in batch]
        table = torch.tensor(rows, dtype=torch.float64, device=device)[..., None, None]
        self.kind, self.fill, self.cx, self.cy, self.radius, self.cos, self.sin, self.period, present = table.unbind(2)
        self.present = present > 0
        colours = [[COLOURS[s.colour] for s in scene.shapes] + [(0, 0, 0)] * (slots - len(scene.shapes))
                   for scene in batch]
        self.colour = torch.tensor(colours, dtype=torch.float32, device=device)[..., None, None]  # (B, S, 3, 1, 1)

    def masks(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, S, H, W) bool: where each shape covers the points of the grid of columns x (1, W) and rows y (H, 1)
        in [0, 1] (separable: per-row and per-column terms first, one broadcast each at the end)."""
        dx, dy = x - self.cx, y - self.cy
        circle = dx**2 + dy**2 <= self.radius**2
        half = self.radius * 0.85
        square = (dx.abs() <= half) & (dy.abs() <= half)
        r = self.radius * 1.1  # an upward equilateral triangle inscribed in the circle of the given radius
        triangle = (dy <= r / 2) & (math.sqrt(3) * dx - dy <= r) & (-math.sqrt(3) * dx - dy <= r)
        return torch.where(self.kind == 0, circle, torch.where(self.kind == 1, square, triangle)) & self.present

    def textures(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, S, H, W) bool on the same grid: where the fill shows the full colour, not the lighter tint."""
        half = self.period / 2
        stripes = torch.remainder(x * self.cos / half + y * self.sin / half, 2) < 1
        columns, rows = (torch.remainder((v - c) / self.period, 2) < 1 for v, c in ((x, self.cx), (y, self.cy)))
        checks = columns == rows  # separable: per column and per row, then one broadcast
        return (self.fill == 0) | torch.where(self.fill == 1, stripes, checks)


def grid(side: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Columns x (1, side) and rows y (side, 1), float64, of the pixel centres in [0, 1]."""
    coords = (torch.arange(side, dtype=torch.float64, device=device) + 0.5) / side
    return coords[None, :], coords[:, None]


def render_batch(batch: Sequence[Scene], size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The scenes as (B, size, size, 3) uint8 on the device, supersampled so that edges are anti-aliased.

    Vectorised over the batch: on a GPU a training batch renders in milliseconds, so the model, not the renderer,
    bounds the step rate. Chunks of RENDER_CHUNK keep a CPU's working set in its caches."""
    chunks = [_render(batch[i:i + RENDER_CHUNK], size, device) for i in range(0, len(batch), RENDER_CHUNK)]
    return torch.cat(chunks)


def _render(batch: Sequence[Scene], size: int, device: torch.device | str) -> torch.Tensor:
    n = size * SUPERSAMPLE
    x, y = grid(n, device)
    direction = torch.tensor([s.direction for s in batch], dtype=torch.float64, device=device)[:, None, None, None]
    t = ((x - 0.5) * torch.cos(direction) + (y - 0.5) * torch.sin(direction) + 0.5).clamp(0, 1).float()
    a, b = torch.tensor([s.background for s in batch], dtype=torch.float32, device=device)[..., None, None].unbind(1)
    image = a + t * (b - a)  # (B, 3, n, n): channels first, so that the 2x2 average is one pooling
    shapes = ShapeTable(batch, device)
    masks, textures = shapes.masks(x, y), shapes.textures(x, y)
    for k in range(masks.shape[1]):
        colour = shapes.colour[:, k]
        tint = 0.45 * colour + 0.55 * 255.0
        shown = tint + textures[:, k, None].float() * (colour - tint)
        image = torch.where(masks[:, k, None], shown, image)
    image = F.avg_pool2d(image, SUPERSAMPLE)
    return image.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def render(scene: Scene, size: int) -> np.ndarray:
    """One scene as (size, size, 3) uint8."""
    return render_batch([scene], size)[0].numpy()


_TEMPLATES = (
    "{a} {colour} {fill} {shape}",
    "a {fill} {colour} {shape} {where}",
    "{colour} {shape}, {fill}, {where}",
    "a {shape} in {colour}, {fill}",
)
_PLACED_SIBLING = {0: 1, 3: 2}  # a phrasing without the place -> the closest one with it


def _where(shape: Shape) -> str:
    position = shape.position()
    return "in the centre" if position == "centre" else f"at the {position}"


def caption(scene: Scene, rng: np.random.Generator, place: float = 0.0) -> str:
    """A caption naming shape, colour and fill (and, in half the phrasings, place) of every shape. With place > 0,
    a part whose phrasing leaves the place out names it anyway with that chance (its placed sibling phrasing):
    training captions that teach places more often. The scene is drawn first, so it does not change."""
    parts = []
    for shape in scene.shapes:
        template = int(rng.integers(len(_TEMPLATES)))
        if place > 0 and "{where}" not in _TEMPLATES[template] and rng.random() < place:
            template = _PLACED_SIBLING[template]
        article = "an" if shape.colour == "orange" else "a"
        words = {"colour": shape.colour, "fill": shape.fill, "shape": shape.shape, "where": _where(shape)}
        parts.append(_TEMPLATES[template].format(a=article, **words))
    return " and ".join(parts)


def scene_from_seed(seed: int, place: float = 0.0) -> tuple[Scene, str]:
    """The scene and caption of a seed: the unit of the training set and of the held-out set (place: `caption`'s,
    0 for held-out captions)."""
    rng = np.random.default_rng(seed)
    scene = sample_scene(rng)
    return scene, caption(scene, rng, place)


def held_out_captions(n: int) -> list[str]:
    """Captions of the first n held-out scenes: in-domain prompts for evaluating the demo model."""
    return [scene_from_seed(HELD_OUT_SEED + i)[1] for i in range(n)]


def batch(seeds: range | list[int], size: int) -> tuple[np.ndarray, list[str], list[Scene]]:
    """Rendered images (B, size, size, 3) uint8, captions and scenes of the given seeds."""
    scenes, captions = zip(*(scene_from_seed(s) for s in seeds), strict=True)
    return render_batch(scenes, size).numpy(), list(captions), list(scenes)


def held_out(n: int, size: int) -> tuple[np.ndarray, list[str], list[Scene]]:
    """The first n held-out scenes, rendered: what the tokenizer and the generated pictures are judged on."""
    return batch(range(HELD_OUT_SEED, HELD_OUT_SEED + n), size)
