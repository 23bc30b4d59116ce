"""The offline models: a tiny open_clip CLIP and CoCa trained on synthetic scenes.

They exist so that search and captioning can be checked for meaning on a
machine that cannot download real weights. Their trained weights ship with
the package (`weights/`, a few MB: only the rows of the vocabulary that the
scenes' texts use are stored) and are unpacked into the cache on first use.
When the config or recipe changes, the shipped weights no longer match, and
the model is trained here instead; `make models` retrains and reships both.
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
import torch.nn.functional as F
from tqdm import tqdm

from clipgram import synthetic

log = logging.getLogger("clipgram.models")

TINY_CLIP = "clipgram-tiny-clip"
TINY_COCA = "clipgram-tiny-coca"
CONFIG_DIR = Path(__file__).parent / "configs"
SHIPPED_DIR = Path(__file__).parent / "weights"
RECIPE_VERSION = 2  # bump when training changes in a way the recipes below don't show
SEED = 0
PAD_ID = 0  # open_clip's tokenizer pads with 0


@dataclass(frozen=True)
class Recipe:
    steps: int
    groups_per_batch: int  # (colour, background) groups, each with all its shapes
    lr: float
    short_prompts: float  # share of texts given as "a {color} {shape}", as people search
    unnamed_per_shape: int  # per batch: renders of each shape in colours no text names
    renders_per_scene: int = 32


RECIPES = {
    TINY_CLIP: Recipe(steps=2000, groups_per_batch=21, lr=2e-3, short_prompts=0.3, unnamed_per_shape=8),
    # CoCa learns to caption from its training texts: full captions only
    TINY_COCA: Recipe(steps=400, groups_per_batch=16, lr=2e-3, short_prompts=0.0, unnamed_per_shape=8),
}


def register_configs() -> None:
    """Make the tiny architectures known to open_clip (idempotent)."""
    if not {TINY_CLIP, TINY_COCA} <= set(open_clip.list_models()):
        open_clip.add_model_config(CONFIG_DIR)


register_configs()


def is_held_out(scene: synthetic.Scene) -> bool:
    """One background per colour, each colour once a background: pairs never seen in training,
    in any shape, to test that colour, shape and background are learned apart."""
    colors = list(synthetic.COLORS)
    return colors[(colors.index(scene.color) + 3) % len(colors)] == scene.background


def short_prompt(scene: synthetic.Scene) -> str:
    return f"a {scene.color} {scene.shape}"


def shape_prompt(shape: str) -> str:
    return f"a {shape}"


def _fingerprint(arch: str) -> str:
    config = (CONFIG_DIR / f"{arch}.json").read_bytes()
    recipe = f"{RECIPE_VERSION}:{RECIPES[arch]}".encode()
    return hashlib.sha256(config + recipe).hexdigest()[:10]


def ensure_checkpoint(arch: str, cache_dir: Path) -> Path:
    """The trained checkpoint for `arch` in `cache_dir`: unpacked from the shipped weights,
    or trained here when those are missing or were trained to another recipe."""
    path = Path(cache_dir) / f"{arch}-{_fingerprint(arch)}.pt"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be training it right now
        if not path.is_file():
            _save_atomically(_shipped_state(arch) or _train(arch), path)
    return path


def shipped_path(arch: str) -> Path:
    return SHIPPED_DIR / f"{arch}.pt"


def _shipped_state(arch: str) -> dict[str, torch.Tensor] | None:
    path = shipped_path(arch)
    if not path.is_file():
        log.info("no shipped weights for %s at %s", arch, path)
        return None
    packed = torch.load(path, map_location="cpu", weights_only=True)
    if packed["fingerprint"] != _fingerprint(arch):
        log.warning("the shipped weights of %s were trained to another config or recipe: "
                    "training it here (`make models` reships them)", arch)
        return None
    return unpack(packed)


def pack(state: dict[str, torch.Tensor], used: torch.Tensor, vocab_size: int,
         fingerprint: str) -> dict:
    """A compact copy of `state`: fp16, and of each vocabulary axis only the `used` rows
    (training keeps the others at zero, so nothing is lost but the precision)."""
    axes = {k: v.shape.index(vocab_size) for k, v in state.items() if vocab_size in v.shape}
    tensors = {k: (v.index_select(axes[k], used) if k in axes else v) for k, v in state.items()}
    return {"fingerprint": fingerprint, "vocab_size": vocab_size, "used": used, "axes": axes,
            "state": {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}}


def unpack(packed: dict) -> dict[str, torch.Tensor]:
    state = {}
    for key, value in packed["state"].items():
        value = value.float() if value.is_floating_point() else value
        if key in packed["axes"]:
            axis = packed["axes"][key]
            shape = list(value.shape)
            shape[axis] = packed["vocab_size"]
            full = value.new_zeros(shape)
            value = full.index_copy_(axis, packed["used"], value)
        state[key] = value
    return state


def _save_atomically(state: dict, path: Path) -> None:
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
                   ) -> tuple[list[synthetic.Scene], torch.Tensor, torch.Tensor]:
    """Training scenes with `renders_per_scene` preprocessed renders of each, and as many
    renders of each shape in unnamed colours."""
    scenes = [s for s in synthetic.all_scenes() if not is_held_out(s)]
    # rendered larger than the model's input at times, so that it also sees the
    # smooth edges that downscaling real-size pictures gives
    images = torch.stack([
        torch.stack([preprocess(synthetic.render(scene, rng.choice((64, 96, 128)), rng))
                     for _ in range(recipe.renders_per_scene)])
        for scene in scenes])
    unnamed = []
    for shape in synthetic.SHAPES:
        renders = []
        for _ in range(len(scenes) * recipe.renders_per_scene // len(synthetic.SHAPES)):
            background = synthetic.unnamed_color(rng)
            fill = synthetic.unnamed_color(rng, away_from=(background,))
            where = synthetic.place(rng.choice((64, 96, 128)), rng)
            renders.append(preprocess(synthetic.draw(shape, fill, background, where, rng)))
        unnamed.append(torch.stack(renders))
    return scenes, images, torch.stack(unnamed)


def _contrastive_loss(out: dict[str, torch.Tensor], texts: torch.Tensor) -> torch.Tensor:
    """CLIP's loss with every pair of the same text a positive: a batch may then hold many
    renders captioned "a circle" without teaching the model to tell them apart."""
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
    same = (texts[:, None, :] == texts[None, :, :]).all(-1).float()
    target = same / same.sum(1, keepdim=True)  # symmetric: the same targets for both directions
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def used_tokens(tokenizer) -> torch.Tensor:
    """The token ids of every text the models train on, padding included: the only rows of
    the vocabulary that training may change."""
    texts = [t for s in synthetic.all_scenes() for t in (s.caption, short_prompt(s))]
    texts += [shape_prompt(shape) for shape in synthetic.SHAPES]
    return torch.unique(torch.cat([tokenizer(texts).flatten(), torch.tensor([PAD_ID])]))


def _confine_to(model: torch.nn.Module, used: torch.Tensor, vocab_size: int) -> None:
    """Keep every unused vocabulary row at zero: zero now, and a zero gradient (so that AdamW,
    whose decay and update are both proportional, never moves them). The shipped weights then
    need only the used rows, and a word never trained on adds nothing to a text."""
    for param in model.parameters():
        if vocab_size in param.shape:
            axis = param.shape.index(vocab_size)
            shape = [1] * param.dim()
            shape[axis] = vocab_size
            keep = torch.zeros(vocab_size, dtype=param.dtype)
            keep[used] = 1
            keep = keep.view(shape)
            with torch.no_grad():
                param.mul_(keep)
            param.register_hook(lambda grad, keep=keep: grad * keep)


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
        captioning = hasattr(model, "text_decoder")
        if captioning:
            # open_clip leaves the CoCa decoder's output projection uninitialised (torch.empty)
            proj = model.text_decoder.text_projection
            torch.nn.init.normal_(proj, std=proj.shape[0] ** -0.5)
        tokenizer = open_clip.get_tokenizer(arch)
        _confine_to(model, used_tokens(tokenizer), tokenizer.vocab_size)
        scenes, images, unnamed = _training_data(preprocess, recipe, rng)
        captions = tokenizer([s.caption for s in scenes])
        shorts = tokenizer([short_prompt(s) for s in scenes])
        shape_texts = tokenizer([shape_prompt(shape) for shape in synthetic.SHAPES])
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
            # apart, so shapes must be learned
            idx = torch.tensor([i for g in rng.sample(groups, recipe.groups_per_batch) for i in g])
            renders = torch.randint(recipe.renders_per_scene, (len(idx),))
            short = torch.rand(len(idx)) < recipe.short_prompts
            texts = torch.where(short[:, None], shorts[idx], captions[idx])
            # and shapes in colours no caption names, so that shape is learned apart from
            # colour: else a held-out pair of colours gets a shape those colours were seen with
            shape = torch.arange(len(synthetic.SHAPES)).repeat_interleave(recipe.unnamed_per_shape)
            pick = torch.randint(unnamed.shape[1], (len(shape),))
            out = model(torch.cat([images[idx, renders], unnamed[shape, pick]]),
                        torch.cat([texts, shape_texts[shape]]))
            losses = {"contrastive": _contrastive_loss(out, torch.cat([texts, shape_texts[shape]]))}
            if captioning:
                # captions only for the named scenes: the decoder learns to name every colour
                named = len(idx)
                losses["caption"] = F.cross_entropy(out["logits"][:named].permute(0, 2, 1),
                                                    out["labels"][:named], ignore_index=PAD_ID)
            loss = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            bar.set_postfix({k: f"{v.item():.3f}" for k, v in losses.items()})
        model.eval()
        state = model.state_dict()
    finally:
        torch.set_num_threads(threads)
    log.info("trained %s in %.0f s", arch, time.monotonic() - started)
    return state


def reship(arch: str, cache_dir: Path) -> Path:
    """Train `arch` and write its packed weights to SHIPPED_DIR (`make models`); the cached
    copy of the same recipe is replaced by the new one at its next use."""
    tokenizer = open_clip.get_tokenizer(arch)
    packed = pack(_train(arch), used_tokens(tokenizer), tokenizer.vocab_size, _fingerprint(arch))
    SHIPPED_DIR.mkdir(exist_ok=True)
    _save_atomically(packed, shipped_path(arch))
    (Path(cache_dir) / f"{arch}-{_fingerprint(arch)}.pt").unlink(missing_ok=True)
    return shipped_path(arch)


def main() -> None:
    from clipgram import config
    from clipgram.models.clip import model_cache_dir

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)  # our lines; open_clip's INFO stays out
    cache_dir = model_cache_dir(config.load_config().models.cache_dir)
    for arch in RECIPES:
        path = reship(arch, cache_dir)
        log.info("wrote %s (%.1f MB)", path, path.stat().st_size / 1e6)


if __name__ == "__main__":
    main()
