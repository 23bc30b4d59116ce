"""Synthetic scenes: a coloured shape on a coloured background, with its caption.

They are what the offline models are trained on and what the embedded sample
profile shows, so that search and captioning can be checked for meaning on a
machine that cannot download real weights.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from itertools import product

from PIL import Image, ImageDraw, ImageFilter, ImageFont

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.color} {self.shape} on a {self.background} background"


def all_scenes() -> list[Scene]:
    """Every scene whose shape stands out from its background."""
    return [
        Scene(shape, color, background)
        for shape, color, background in product(SHAPES, COLORS, COLORS)
        if color != background
    ]


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, ...]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def render(scene: Scene, size: int = 224, rng: random.Random | None = None) -> Image.Image:
    """Draw `scene` at a random position, scale and rotation; colours jittered a little."""
    rng = rng or random.Random()
    # drawn from `rng` in this order, which the embedded sample's seed depends on
    background = _jitter(COLORS[scene.background], rng, 12)
    where = place(size, rng)
    return draw(scene.shape, named_color(scene.color, rng), background, where, rng)


def named_color(name: str, rng: random.Random) -> tuple[int, ...]:
    """The colour `name` as a shape is filled with it: jittered a little."""
    return _jitter(COLORS[name], rng, 18)


def unnamed_color(rng: random.Random, away_from: tuple[tuple[int, ...], ...] = ()) -> tuple[int, ...]:
    """A colour far from every named one (and from `away_from`): no caption could name it."""
    while True:
        rgb = tuple(rng.randrange(256) for _ in range(3))
        if all(math.dist(rgb, other) > 80 for other in (*COLORS.values(), *away_from)):
            return rgb


def place(size: int, rng: random.Random) -> tuple[int, float, float, float]:
    """Where a shape goes in a `size` square: (size, radius, centre x, centre y)."""
    radius = size * rng.uniform(0.18, 0.34)
    return size, radius, rng.uniform(radius, size - radius), rng.uniform(radius, size - radius)


def draw(shape: str, fill: tuple[int, ...], background: tuple[int, ...],
         where: tuple[int, float, float, float], rng: random.Random) -> Image.Image:
    """A `shape` filled with `fill` on `background` at `where`, turned at random, blurred at times."""
    size, radius, cx, cy = where
    img = Image.new("RGB", (size, size), background)
    pen = ImageDraw.Draw(img)
    if shape == "circle":
        pen.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    else:
        corners = 4 if shape == "square" else 3
        turn = rng.uniform(0, 2 * math.pi)
        points = [
            (cx + radius * math.cos(turn + 2 * math.pi * i / corners),
             cy + radius * math.sin(turn + 2 * math.pi * i / corners))
            for i in range(corners)
        ]
        pen.polygon(points, fill=fill)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    return img


def poster(lines: list[str], size: int = 320, rng: random.Random | None = None) -> Image.Image:
    """A poster: `lines` of dark text centred on a light ground, the size scaled to fit the
    widest line (Pillow's own TrueType font: the same pixels on every machine)."""
    rng = rng or random.Random(0)
    image = Image.new("RGB", (size, size), _jitter((238, 232, 215), rng, 12))
    pen = ImageDraw.Draw(image)
    font_size = size // 8
    while font_size > 8:
        font = ImageFont.load_default(font_size)
        if max(pen.textlength(line, font=font) for line in lines) <= 0.86 * size:
            break
        font_size -= 1
    step = font_size * 1.35
    top = (size - step * len(lines)) / 2
    for i, line in enumerate(lines):
        pen.text((size / 2, top + i * step), line, fill=(25, 25, 35), font=font, anchor="ma")
    return image
