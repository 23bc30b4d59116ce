"""The offline models mean something: checked on fresh renders, and on scenes held out of training.

Nothing here is a stored model output: each test renders scenes with a fixed
seed, asks the model, and checks its answer against the scene it drew.
"""

import random

import pytest
import torch

from clipgram import synthetic
from clipgram.models import captioner, clip, resolve, tiny

HELD_OUT = [s for s in synthetic.all_scenes() if tiny.is_held_out(s)]
# fresh renders of trained scenes: one scene of every (colour, shape) pair
SEEN = list({(s.color, s.shape): s for s in synthetic.all_scenes() if not tiny.is_held_out(s)}.values())


def _renders(scenes: list[synthetic.Scene], seed: int) -> list:
    rng = random.Random(seed)
    return [synthetic.render(scene, 224, rng) for scene in scenes]


@pytest.fixture(scope="module")
def encoder(tiny_clip_ckpt):
    spec = resolve.resolve("tiny", default="", tiny_arch=tiny.TINY_CLIP, cache_dir=tiny_clip_ckpt.parent)
    return clip.ClipEncoder(spec, torch.device("cpu"))


@pytest.fixture(scope="module")
def coca(tiny_coca_ckpt):
    spec = resolve.resolve("tiny", default="", tiny_arch=tiny.TINY_COCA, cache_dir=tiny_coca_ckpt.parent)
    return captioner.Captioner(spec, torch.device("cpu"))


def _top1(encoder, scenes: list[synthetic.Scene], seed: int) -> list[tuple[str, synthetic.Scene]]:
    """For each scene's short prompt ("a red circle"), the scene whose render ranks first."""
    images = encoder.encode_images(torch.stack([encoder.preprocess(i) for i in _renders(scenes, seed)]))
    prompts = [tiny.short_prompt(s) for s in scenes]
    best = (encoder.encode_text(prompts) @ images.T).argmax(axis=1)
    return [(scene, scenes[j]) for scene, j in zip(scenes, best)]


def test_clip_finds_the_colour_of_held_out_scenes(encoder):
    pairs = _top1(encoder, HELD_OUT, seed=1)
    right = sum(asked.color == found.color for asked, found in pairs)
    assert right / len(pairs) >= 0.9  # chance: about 1 in 8


def test_clip_finds_colour_and_shape_of_fresh_renders(encoder):
    pairs = _top1(encoder, SEEN, seed=2)
    right = sum((asked.color, asked.shape) == (found.color, found.shape) for asked, found in pairs)
    assert right / len(pairs) >= 0.5  # chance: 1 in 24


def test_coca_names_colour_and_background_of_held_out_scenes(coca):
    images = torch.stack([coca.preprocess(i) for i in _renders(HELD_OUT, seed=3)])
    captions = coca.caption(images)
    assert all(c and "<" not in c for c in captions)  # special tokens cleaned away
    words = [c.split() for c in captions]
    colour = sum(s.color in w[:3] for s, w in zip(HELD_OUT, words))  # "a red …": the shape's colour
    background = sum(s.background in w[3:] for s, w in zip(HELD_OUT, words))
    assert colour / len(HELD_OUT) >= 0.9 and background / len(HELD_OUT) >= 0.9
