"""The toy judge: a small CNN that reads a scene's shape, colour, size and place back from an image.

It scores samples of the toy model (does "a big red circle" show a big red circle?),
and its penultimate features measure how far two images are apart in content rather than in pixels.
It is trained on rendered scenes of every shape and colour (also those the toy model never saw),
blurred, noised and shifted a little, so that soft, imperfect samples are still read correctly.
The trained weights ship beside this file (``judge.safetensors``, about 0.4 MB).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from .data import COLOURS, POSITIONS, SHAPES, SIZES, Scene, random_scenes, render_scene, to_tensor

JUDGE_FILE = Path(__file__).resolve().parent / "judge.safetensors"
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
}
PROMPTED = ("shape", "colour", "size")  # what captions name (the place is not captioned)
SIZE = 64  # the judge's input side; other sizes are resized
FEATURES = 128


class Judge(nn.Module):
    """Four stride-2 convolutions (64 -> 4 px) and one linear head per attribute.

    ``forward(x)`` takes ``(N, 3, 64, 64)`` images in [-1, 1] and returns attribute -> ``(N, classes)``
    logits; ``features(x)`` the ``(N, 128)`` vector the heads read.
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in zip(chans, chans[1:]))
        self.squeeze = nn.Linear(chans[-1] * 16, FEATURES)
        self.heads = nn.ModuleDict({name: nn.Linear(FEATURES, len(classes)) for name, classes in ATTRIBUTES.items()})

    def features(self, x: Tensor) -> Tensor:
        for conv in self.convs:
            x = F.silu(conv(x))
        return F.silu(self.squeeze(x.flatten(1)))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.features(x)
        return {name: head(h) for name, head in self.heads.items()}


@dataclass(frozen=True)
class JudgeRecipe:
    """How the shipped judge is trained (deterministic from `seed`)."""

    seed: int = 1234
    images: int = 4000
    steps: int = 1500
    batch: int = 64
    lr: float = 3e-3


def _labels(scenes: Sequence[Scene]) -> dict[str, Tensor]:
    return {name: torch.tensor([classes.index(getattr(s, name)) for s in scenes])
            for name, classes in ATTRIBUTES.items()}


def _degrade(x: Tensor, g: torch.Generator) -> Tensor:
    """Blur some images (down and up again), add a little noise and a small brightness change: the
    soft edges and speckle of generated samples."""
    n = x.shape[0]
    blur = torch.rand(n, generator=g) < 0.5
    if blur.any():
        small = F.interpolate(x[blur], scale_factor=0.5, mode="bilinear", align_corners=False)
        x = x.clone()
        x[blur] = F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)
    noise = torch.randn(x.shape, generator=g) * torch.rand(n, 1, 1, 1, generator=g) * 0.15
    shift = (torch.rand(n, 1, 1, 1, generator=g) - 0.5) * 0.2
    return (x + noise + shift).clamp(-1, 1)


def train_judge(recipe: JudgeRecipe = JudgeRecipe(), log=print) -> Judge:
    """Train a judge on `recipe.images` random scenes of every shape (deterministic on one thread)."""
    torch.manual_seed(recipe.seed)
    judge = Judge()
    scenes = random_scenes(recipe.images, recipe.seed, SHAPES, colours=list(COLOURS))
    x_all = to_tensor([render_scene(s, SIZE) for s in scenes])
    y_all = _labels(scenes)
    opt = torch.optim.AdamW(judge.parameters(), lr=recipe.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, recipe.lr, total_steps=recipe.steps, pct_start=0.1)
    g = torch.Generator().manual_seed(recipe.seed)
    judge.train()
    for step in range(recipe.steps):
        idx = torch.randint(0, len(scenes), (recipe.batch,), generator=g)
        logits = judge(_degrade(x_all[idx], g))
        loss = sum(F.cross_entropy(logits[k], y_all[k][idx]) for k in ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log and (step % 250 == 0 or step == recipe.steps - 1):
            log(f"judge step {step}: loss {loss.item():.4f}")
    return judge.eval()


def save_judge(judge: Judge, path: str | Path = JUDGE_FILE) -> Path:
    """Write the judge's weights as fp16 safetensors (deterministic bytes)."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in judge.state_dict().items()}, str(path))
    return path


def load_judge(path: str | Path = JUDGE_FILE) -> Judge:
    """The judge stored at `path` (default: the one shipped with lycoft), in eval mode, float32."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"judge weights not found at {path}; train them with tools/pretrain_toy.py")
    judge = Judge()
    judge.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return judge.eval()


@torch.no_grad()
def read_images(judge: Judge, images: Sequence[Image.Image] | Tensor) -> list[dict[str, str]]:
    """What the judge sees in each image: attribute -> class name."""
    x = images if isinstance(images, Tensor) else to_tensor(images, SIZE)
    logits = judge(x)
    picks = {k: v.argmax(dim=1).tolist() for k, v in logits.items()}
    return [{k: ATTRIBUTES[k][picks[k][i]] for k in ATTRIBUTES} for i in range(x.shape[0])]


@torch.no_grad()
def image_features(judge: Judge, images: Sequence[Image.Image] | Tensor) -> Tensor:
    """The judge's ``(N, 128)`` features of each image (for content distances)."""
    x = images if isinstance(images, Tensor) else to_tensor(images, SIZE)
    return judge.features(x)


def accuracy(judge: Judge, images: Sequence[Image.Image], scenes: Sequence[Scene]) -> dict[str, float]:
    """Fraction of images whose shape / colour / size / position the judge reads as the scene says."""
    seen = read_images(judge, images)
    return {k: sum(s[k] == getattr(t, k) for s, t in zip(seen, scenes)) / max(len(scenes), 1)
            for k in ATTRIBUTES}


def held_out_accuracy(judge: Judge, n: int = 1000, seed: int = 99) -> dict[str, float]:
    """Accuracy on `n` fresh rendered scenes of every shape and colour (a seed the training did not use)."""
    scenes = random_scenes(n, seed, SHAPES, colours=list(COLOURS))
    return accuracy(judge, [render_scene(s, SIZE) for s in scenes], scenes)

