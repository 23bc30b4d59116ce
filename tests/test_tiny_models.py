"""The offline models see colour, shape and background: checked on the weights the package
ships, on fresh renders of scenes held out of training.

The bar: CLIP ranks the right image first for 95 % of "a {colour} {shape}" prompts,
CoCa names the colour, shape and background of 90 % of the renders.
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


def _shipped(arch: str, tmp_path_factory) -> resolve.Resolved:
    """The shipped weights themselves (not a cache a local training may have filled)."""
    packed = torch.load(tiny.shipped_path(arch), weights_only=True)
    assert packed["fingerprint"] == tiny._fingerprint(arch), "the recipe changed: run `make models`"
    path = tmp_path_factory.mktemp("shipped") / f"{arch}.pt"
    torch.save(tiny.unpack(packed), path)
    return resolve.resolve(f"{arch}:{path}", default="", tiny_arch=arch, cache_dir=path.parent)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return clip.ClipEncoder(_shipped(tiny.TINY_CLIP, tmp_path_factory), torch.device("cpu"))


@pytest.fixture(scope="module")
def coca(tmp_path_factory):
    return captioner.Captioner(_shipped(tiny.TINY_COCA, tmp_path_factory), torch.device("cpu"))


@pytest.mark.parametrize("arch", [tiny.TINY_CLIP, tiny.TINY_COCA])
def test_shipped_weights_are_a_few_mb_and_unpack_into_the_cache(arch, tmp_path, caplog):
    assert tiny.shipped_path(arch).stat().st_size < 4e6
    caplog.set_level("INFO", "clipgram.models")
    path = tiny.ensure_checkpoint(arch, tmp_path)  # an empty cache: unpacked, not trained
    assert path.is_file() and not any("training" in r.message for r in caplog.records)
    packed = torch.load(tiny.shipped_path(arch), weights_only=True)
    state = torch.load(path, weights_only=True)
    for key, axis in packed["axes"].items():  # the vocabulary's unused rows are zero
        unused = torch.ones(state[key].shape[axis], dtype=torch.bool)
        unused[packed["used"]] = False
        assert not state[key].index_select(axis, unused.nonzero()[:, 0]).any()


def _top1(encoder, scenes: list[synthetic.Scene], seed: int) -> list[tuple[str, synthetic.Scene]]:
    """For each scene's short prompt ("a red circle"), the scene whose render ranks first."""
    images = encoder.encode_images(torch.stack([encoder.preprocess(i) for i in _renders(scenes, seed)]))
    prompts = [tiny.short_prompt(s) for s in scenes]
    best = (encoder.encode_text(prompts) @ images.T).argmax(axis=1)
    return [(scene, scenes[j]) for scene, j in zip(scenes, best)]


def _clip_right(encoder, scenes) -> float:
    pairs = [pair for seed in (1, 2, 3) for pair in _top1(encoder, scenes, seed)]
    return sum((asked.color, asked.shape) == (found.color, found.shape) for asked, found in pairs) / len(pairs)


def test_clip_finds_colour_and_shape_of_held_out_scenes(encoder):
    # issue 18's goal, 95 %: the shipped weights find 70 of 72; chance is 1 in 24
    assert _clip_right(encoder, HELD_OUT) >= 0.95


def test_clip_finds_colour_and_shape_of_fresh_renders(encoder):
    assert _clip_right(encoder, SEEN) >= 0.95


def _coca_named(coca) -> tuple[float, float, float]:
    scenes = HELD_OUT * 3
    images = torch.stack([coca.preprocess(i) for i in _renders(scenes, seed=3)])
    captions = coca.caption(images)
    assert all(c and "<" not in c for c in captions)  # special tokens cleaned away
    words = [c.split() for c in captions]  # "a red circle on a blue background"
    colour = sum(w[1:2] == [s.color] for s, w in zip(scenes, words))
    shape = sum(w[2:3] == [s.shape] for s, w in zip(scenes, words))
    background = sum(s.background in w[3:] for s, w in zip(scenes, words))
    return colour / len(scenes), shape / len(scenes), background / len(scenes)


def test_coca_names_colour_shape_and_background_of_held_out_scenes(coca):
    colour, shape, background = _coca_named(coca)
    assert colour >= 0.9 and shape >= 0.9 and background >= 0.9
