"""The domain's yardstick, as GenEval is for the real models: a small classifier that tells whether the
requested shapes, colours and fills are in a picture."""

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sparsevar.demo import scenes

ATTRIBUTES = (*scenes.SHAPES, *scenes.COLOURS, *scenes.FILLS)
SHIPPED = Path(__file__).parent / "weights" / "yardstick.safetensors"


Judge = Callable[[list[np.ndarray], list[str]], float]


def pixels(images_BHWC: np.ndarray) -> torch.Tensor:
    """uint8 pictures as the tokenizer and the yardstick see them: (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images_BHWC)).permute(0, 3, 1, 2).float() / 127.5 - 1


def scene_labels(scene: scenes.Scene) -> torch.Tensor:
    """Multi-hot presence of every attribute in a scene: (len(ATTRIBUTES),)."""
    present = {a for shape in scene.shapes for a in (shape.shape, shape.colour, shape.fill)}
    return torch.tensor([float(a in present) for a in ATTRIBUTES])


def requested(prompt: str) -> list[int]:
    """Indices of the attributes a prompt names."""
    words = set(re.findall(r"[a-z]+", prompt.lower()))
    return [i for i, a in enumerate(ATTRIBUTES) if a in words]


class Yardstick(nn.Module):
    """Pictures (B, 3, H, W) in [-1, 1], seen at 64x64 -> presence logits of every attribute."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c_out in (width, width, 2 * width, 2 * width):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, len(ATTRIBUTES))

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        x_BCHW = F.interpolate(x_BCHW, size=(64, 64), mode="area")
        return self.head(self.features(x_BCHW).amax(dim=(2, 3)))

    @torch.no_grad()
    def score(self, x_BCHW: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Per picture, the share of the prompt's named attributes the classifier finds: (B,) in [0, 1]."""
        found_BA = self(x_BCHW) > 0
        named = [requested(p) for p in prompts]
        return torch.tensor([found_BA[b, idx].float().mean().item() if idx else 1.0 for b, idx in enumerate(named)])


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
