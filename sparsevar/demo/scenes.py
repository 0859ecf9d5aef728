"""Procedural captioned scenes: smooth gradient backgrounds, one or two sharp-edged shapes, fine textures.

Exactly the structure SparseVAR exploits: most of a picture is low-frequency, detail sits on edges and fills.
Every scene is a pure function of its seed.
"""

from dataclasses import dataclass

import numpy as np

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
SUPERSAMPLE = 2
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
        vertical = "top" if self.cy < 0.38 else "bottom" if self.cy > 0.62 else ""
        horizontal = "left" if self.cx < 0.38 else "right" if self.cx > 0.62 else ""
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


def _mask(shape: Shape, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    dx, dy = x - shape.cx, y - shape.cy
    if shape.shape == "circle":
        return dx**2 + dy**2 <= shape.radius**2
    if shape.shape == "square":
        half = shape.radius * 0.85
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    # An upward equilateral triangle inscribed in the circle of the given radius.
    r = shape.radius * 1.1
    return (dy <= r / 2) & (np.sqrt(3) * dx - dy <= r) & (-np.sqrt(3) * dx - dy <= r)


def _texture(shape: Shape, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """1 where the fill shows the full colour, 0 where it shows the lighter tint."""
    if shape.fill == "solid":
        return np.ones_like(x)
    if shape.fill == "striped":
        t = x * np.cos(shape.angle) + y * np.sin(shape.angle)
        return (np.floor(t / (shape.period / 2)) % 2 == 0).astype(x.dtype)
    cells = np.floor((x - shape.cx) / shape.period) + np.floor((y - shape.cy) / shape.period)
    return (cells % 2 == 0).astype(x.dtype)


def render(scene: Scene, size: int) -> np.ndarray:
    """The scene as (size, size, 3) uint8, supersampled so that edges are anti-aliased."""
    n = size * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / n
    x, y = np.meshgrid(coords, coords)
    t = (x - 0.5) * np.cos(scene.direction) + (y - 0.5) * np.sin(scene.direction) + 0.5
    a, b = (np.array(c, dtype=np.float32) for c in scene.background)
    image = a + np.clip(t, 0, 1)[..., None].astype(np.float32) * (b - a)
    for shape in scene.shapes:
        colour = np.array(COLOURS[shape.colour], dtype=np.float32)
        tint = 0.45 * colour + 0.55 * 255.0
        texture = _texture(shape, x, y)[..., None].astype(np.float32)
        image = np.where(_mask(shape, x, y)[..., None], tint + texture * (colour - tint), image)
    image = image.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


_TEMPLATES = (
    "{a} {colour} {fill} {shape}",
    "a {fill} {colour} {shape} {where}",
    "{colour} {shape}, {fill}, {where}",
    "a {shape} in {colour}, {fill}",
)


def _where(shape: Shape) -> str:
    position = shape.position()
    return "in the centre" if position == "centre" else f"at the {position}"


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption naming shape, colour and fill (and place) of every shape, in one of a few phrasings."""
    parts = []
    for shape in scene.shapes:
        template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
        article = "an" if shape.colour == "orange" else "a"
        words = {"colour": shape.colour, "fill": shape.fill, "shape": shape.shape, "where": _where(shape)}
        parts.append(template.format(a=article, **words))
    return " and ".join(parts)


def scene_from_seed(seed: int) -> tuple[Scene, str]:
    """The scene and caption of a seed: the unit of the training set and of the held-out set."""
    rng = np.random.default_rng(seed)
    scene = sample_scene(rng)
    return scene, caption(scene, rng)


def held_out_captions(n: int) -> list[str]:
    """Captions of the first n held-out scenes: in-domain prompts for evaluating the demo model."""
    return [scene_from_seed(HELD_OUT_SEED + i)[1] for i in range(n)]


def batch(seeds: range | list[int], size: int) -> tuple[np.ndarray, list[str], list[Scene]]:
    """Rendered images (B, size, size, 3) uint8, captions and scenes of the given seeds."""
    scenes, captions = zip(*(scene_from_seed(s) for s in seeds), strict=True)
    return np.stack([render(s, size) for s in scenes]), list(captions), list(scenes)


def held_out(n: int, size: int) -> tuple[np.ndarray, list[str], list[Scene]]:
    """The first n held-out scenes, rendered: what the tokenizer and the generated pictures are judged on."""
    return batch(range(HELD_OUT_SEED, HELD_OUT_SEED + n), size)
