"""The offline models: a tiny open_clip CLIP and CoCa trained on synthetic scenes.

They exist so that search and captioning can be checked for meaning on a
machine that cannot download real weights. Each is trained once, on the CPU
in about a minute, and cached under a name that changes with its config and
training recipe.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from tqdm import tqdm

from clipgram import synthetic

log = logging.getLogger("clipgram.models")

TINY_CLIP = "clipgram-tiny-clip"
TINY_COCA = "clipgram-tiny-coca"
CONFIG_DIR = Path(__file__).parent / "configs"
RECIPE_VERSION = 1  # bump when training changes in a way the recipes below don't show
SEED = 0


@dataclass(frozen=True)
class Recipe:
    steps: int
    groups_per_batch: int  # (colour, background) groups, each with all its shapes
    lr: float
    short_prompts: float  # share of texts given as "a {color} {shape}", as people search
    renders_per_scene: int = 32


RECIPES = {
    TINY_CLIP: Recipe(steps=400, groups_per_batch=21, lr=2e-3, short_prompts=0.3),
    # CoCa learns to caption from its training texts: full captions only
    TINY_COCA: Recipe(steps=400, groups_per_batch=16, lr=2e-3, short_prompts=0.0),
}


def register_configs() -> None:
    """Make the tiny architectures known to open_clip (idempotent)."""
    if not {TINY_CLIP, TINY_COCA} <= set(open_clip.list_models()):
        open_clip.add_model_config(CONFIG_DIR)


register_configs()


def is_held_out(scene: synthetic.Scene) -> bool:
    """One background per (shape, colour) never seen in training, to test generalisation."""
    colors = list(synthetic.COLORS)
    shift = 1 + (synthetic.SHAPES.index(scene.shape) + colors.index(scene.color)) % 7
    return colors[(colors.index(scene.color) + shift) % len(colors)] == scene.background


def short_prompt(scene: synthetic.Scene) -> str:
    return f"a {scene.color} {scene.shape}"


def _fingerprint(arch: str) -> str:
    config = (CONFIG_DIR / f"{arch}.json").read_bytes()
    recipe = f"{RECIPE_VERSION}:{RECIPES[arch]}".encode()
    return hashlib.sha256(config + recipe).hexdigest()[:10]


def ensure_checkpoint(arch: str, cache_dir: Path) -> Path:
    """The trained checkpoint for `arch` in `cache_dir`, training it first if missing."""
    path = Path(cache_dir) / f"{arch}-{_fingerprint(arch)}.pt"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be training it right now
        if not path.is_file():
            _save_atomically(_train(arch), path)
    return path


def _save_atomically(state: dict[str, torch.Tensor], path: Path) -> None:
    # a killed process leaves at most a stray temp file, never a half checkpoint
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _training_data(preprocess, recipe: Recipe, rng: random.Random
                   ) -> tuple[list[synthetic.Scene], torch.Tensor]:
    """Training scenes and `renders_per_scene` preprocessed renders of each."""
    scenes = [s for s in synthetic.all_scenes() if not is_held_out(s)]
    # rendered larger than the model's input at times, so that it also sees the
    # smooth edges that downscaling real-size pictures gives
    images = torch.stack([
        torch.stack([preprocess(synthetic.render(scene, rng.choice((64, 96, 128)), rng))
                     for _ in range(recipe.renders_per_scene)])
        for scene in scenes])
    return scenes, images


def _train(arch: str) -> dict[str, torch.Tensor]:
    recipe = RECIPES[arch]
    log.info("training the offline model %s on synthetic scenes (once)…", arch)
    started = time.monotonic()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # a fixed count: same result on every machine, and it's enough
    try:
        torch.manual_seed(SEED)
        rng = random.Random(SEED)
        model, _, preprocess = open_clip.create_model_and_transforms(arch, output_dict=True)
        if hasattr(model, "text_decoder"):
            # open_clip leaves the CoCa decoder's output projection uninitialised (torch.empty)
            proj = model.text_decoder.text_projection
            torch.nn.init.normal_(proj, std=proj.shape[0] ** -0.5)
            loss_fn = open_clip.loss.CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=1.0)
        else:
            loss_fn = open_clip.loss.ClipLoss()
        tokenizer = open_clip.get_tokenizer(arch)
        scenes, images = _training_data(preprocess, recipe, rng)
        captions = tokenizer([s.caption for s in scenes])
        shorts = tokenizer([short_prompt(s) for s in scenes])
        groups = {}
        for i, s in enumerate(scenes):
            groups.setdefault((s.color, s.background), []).append(i)
        groups = list(groups.values())

        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.05)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=recipe.lr, total_steps=recipe.steps, pct_start=0.1, cycle_momentum=False)
        bar = tqdm(range(recipe.steps), desc=f"training {arch}", disable=None)
        for _ in bar:
            # whole groups of distinct scenes: colours alone cannot tell the pairs in a batch
            # apart, so shapes must be learned; and no two pairs are the same scene
            idx = torch.tensor([i for g in rng.sample(groups, recipe.groups_per_batch) for i in g])
            renders = torch.randint(recipe.renders_per_scene, (len(idx),))
            short = torch.rand(len(idx)) < recipe.short_prompts
            texts = torch.where(short[:, None], shorts[idx], captions[idx])
            losses = loss_fn(**model(images[idx, renders], texts), output_dict=True)
            loss = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            bar.set_postfix({k.removesuffix("_loss"): f"{v.item():.3f}" for k, v in losses.items()})
        model.eval()
        state = model.state_dict()
    finally:
        torch.set_num_threads(threads)
    log.info("trained %s in %.0f s", arch, time.monotonic() - started)
    return state
