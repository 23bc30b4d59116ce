"""The offline models: a tiny open_clip CLIP and CoCa trained on synthetic scenes.

They exist so that search and captioning can be checked for meaning on a
machine that cannot download real weights. Their trained weights ship with
the package (`weights/`, a few MB: only the rows of the vocabulary that the
scenes' texts use are stored) and are unpacked into the cache on first use.
When the config or recipe changes, the shipped weights no longer match, and
the model is trained here instead; `make models` retrains and reships both.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from clipgram import synthetic

log = logging.getLogger("clipgram.models")

TINY_CLIP = "clipgram-tiny-clip"
TINY_COCA = "clipgram-tiny-coca"
CONFIG_DIR = Path(__file__).parent / "configs"
SHIPPED_DIR = Path(__file__).parent / "weights"
RECIPE_VERSION = 3  # bump when training changes in a way the recipes below don't show
SEED = 0
PAD_ID = 0  # open_clip's tokenizer pads with 0


@dataclass(frozen=True)
class Recipe:
    steps: int
    groups_per_batch: int  # (colour, background) groups, each with all its shapes
    lr: float
    short_prompts: float  # share of texts given as "a {color} {shape}", as people search
    unnamed_per_shape: int  # per batch: renders of each shape in colours no text names
    on_unnamed_per_pair: int  # per batch: renders of each (colour, shape) on unnamed backgrounds
    renders_per_scene: int = 32
    colour_sets: int = 0  # sets of one shape in every named colour on one unnamed background
    colour_sets_per_batch: int = 0
    swap_groups: bool = False  # a batch holds "c1 on c2" with "c2 on c1" where both are trained


RECIPES = {
    # 3 renders of each colour and shape on unnamed backgrounds and 4000 steps: held out, 68 of 72,
    # every miss a yellow shape taken for an orange one on red, or back; with 3 colour sets a
    # batch (each colour told from the others on one background, by the shape's colour alone): 69;
    # with half of each batch's groups joined by their swap ("yellow on white" by "white on
    # yellow"): 70, and no yellow square on white among the query bench's 2,000 scenes read as
    # a white square any more (issue 29: a query for a pair a library does not hold must match
    # nothing; before, two did)
    TINY_CLIP: Recipe(steps=4000, groups_per_batch=21, lr=2e-3, short_prompts=0.3, unnamed_per_shape=8,
                      on_unnamed_per_pair=3, colour_sets=96, colour_sets_per_batch=3, swap_groups=True),
    # CoCa learns to caption from its training texts: full captions only
    TINY_COCA: Recipe(steps=1500, groups_per_batch=16, lr=2e-3, short_prompts=0.0, unnamed_per_shape=8,
                      on_unnamed_per_pair=1),
}


# The stand-ins' vision tower: open_clip's ViT at this size learns colour at once but shape only
# slowly (a shape probe: 58 % after 600 steps; the shipped ViT CLIP found the right shape of
# held-out scenes for about half the prompts after 2000 steps). A small CNN does it in a few
# hundred steps, but only if its grid is max-pooled: a shape covers a few cells among many of
# background, which a mean washes out (the same CNN, average-pooled, stays at chance).
TOWER_CHANNELS = (32, 64, 96, 128)
TOWER_STRIDES = (2, 2, 2, 1)  # 64 px in, an 8×8 grid out


class ConvTower(nn.Module):
    """Images → an embedding (the max over the grid of conv features, projected); with
    `token_width`, also the grid's cells as tokens for a CoCa decoder to attend to."""

    def __init__(self, output_dim: int, image_size: int, token_width: int | None = None):
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out, stride in zip((3, *TOWER_CHANNELS), TOWER_CHANNELS, TOWER_STRIDES):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.proj = nn.Linear(TOWER_CHANNELS[-1], output_dim)
        self.image_size = (image_size, image_size)
        self.output_tokens = token_width is not None
        if self.output_tokens:
            cells = (image_size // math.prod(TOWER_STRIDES)) ** 2 + 1  # and the max
            self.token_proj = nn.Linear(TOWER_CHANNELS[-1], token_width)
            # where a cell is: the decoder tells the shape's colour from the background's by it
            self.token_position = nn.Parameter(torch.randn(cells, token_width) * token_width ** -0.5)
            self.token_norm = nn.LayerNorm(token_width)

    def forward(self, images: torch.Tensor):
        grid = self.body(images)  # [B, C, h, w]
        pooled = self.proj(grid.amax(dim=(2, 3)))
        if not self.output_tokens:
            return pooled
        # the grid's max first, as in the embedding (it sees the shape), then each cell (they
        # tell where it is, and so which colour is the shape's and which the background's)
        cells = torch.cat([grid.amax(dim=(2, 3))[:, None], grid.flatten(2).transpose(1, 2)], 1)
        return pooled, self.token_norm(self.token_proj(cells) + self.token_position)


def _no_weights_yet(record: logging.LogRecord) -> bool:
    """Drops open_clip's "No pretrained weights loaded … initialized randomly" (on the root
    logger), which is untrue of a model whose weights are loaded right after it is built."""
    return not record.getMessage().startswith("No pretrained weights loaded")


def create(arch: str, **kwargs) -> tuple[torch.nn.Module, object]:
    """(model, preprocess) of a tiny architecture, untrained: open_clip's model from the config
    (text tower, CoCa decoder, input size and preprocessing) with a ConvTower for its vision
    tower. `kwargs` go to open_clip."""
    root = logging.getLogger()
    root.addFilter(_no_weights_yet)  # they come next (models.load), or training is said
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(arch, **kwargs)
    finally:
        root.removeFilter(_no_weights_yet)
    decoder = getattr(model, "text_decoder", None)
    tower = ConvTower(model.visual.output_dim, model.visual.image_size[0],
                      decoder.width if decoder is not None else None)
    model.visual = tower.to(model.logit_scale.device)
    return model, preprocess


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


def pair_prompt(color: str, shape: str) -> str:
    return f"a {color} {shape}"


def short_prompt(scene: synthetic.Scene) -> str:
    return pair_prompt(scene.color, scene.shape)


def shape_prompt(shape: str) -> str:
    return f"a {shape}"


def _fingerprint(arch: str) -> str:
    config = (CONFIG_DIR / f"{arch}.json").read_bytes()
    recipe = f"{RECIPE_VERSION}:{RECIPES[arch]}:{TOWER_CHANNELS}:{TOWER_STRIDES}".encode()
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


@dataclass(frozen=True)
class Loose:
    """Renders whose texts name less than they show, so that what a text leaves out is learned
    apart from what it names: else a held-out pair of colours gets the shape, or the colour,
    that those colours were seen with."""
    tokens: torch.Tensor  # [T, context]: the texts
    images: torch.Tensor  # [T, renders, 3, H, W]: renders of each text
    per_batch: int  # renders of each text in every batch
    captioned: bool  # a caption for CoCa to learn too ("a red circle" is; "a circle" would teach it to skip colours)

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        which = torch.arange(len(self.tokens)).repeat_interleave(self.per_batch)
        pick = torch.randint(self.images.shape[1], (len(which),))
        return self.images[which, pick], self.tokens[which]


@dataclass(frozen=True)
class ColourSets:
    """Sets of renders of one shape in every named colour on one unnamed background, each with
    its text: within a set only the shape's colour tells the texts apart, which is what the
    stand-in got wrong among close hues (a yellow shape taken for an orange one on red)."""
    tokens: torch.Tensor  # [S, colours, context]
    images: torch.Tensor  # [S, colours, 3, H, W]
    per_batch: int  # sets in every batch
    captioned: bool = True

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        pick = torch.randint(len(self.images), (self.per_batch,))
        return self.images[pick].flatten(0, 1), self.tokens[pick].flatten(0, 1)


def _colour_sets(preprocess, tokenizer, recipe: Recipe, rng: random.Random) -> ColourSets:
    images, tokens = [], []
    for _ in range(recipe.colour_sets):
        shape, background = rng.choice(synthetic.SHAPES), synthetic.unnamed_color(rng)
        images.append(torch.stack([
            preprocess(synthetic.draw(shape, synthetic.named_color(color, rng), background,
                                      synthetic.place(_size(rng), rng), rng))
            for color in synthetic.COLORS]))
        tokens.append(tokenizer([pair_prompt(color, shape) for color in synthetic.COLORS]))
    return ColourSets(torch.stack(tokens), torch.stack(images), recipe.colour_sets_per_batch)


def _size(rng: random.Random) -> int:
    # rendered larger than the model's input at times, so that it also sees the
    # smooth edges that downscaling real-size pictures gives
    return rng.choice((64, 96, 128))


def _training_data(preprocess, tokenizer, recipe: Recipe, rng: random.Random
                   ) -> tuple[list[synthetic.Scene], torch.Tensor, list[Loose | ColourSets]]:
    """Training scenes with `renders_per_scene` preprocessed renders of each, and the loose
    renders: each shape in unnamed colours ("a circle"), each colour and shape on unnamed
    backgrounds ("a red circle"), and the recipe's colour sets."""
    scenes = [s for s in synthetic.all_scenes() if not is_held_out(s)]
    images = torch.stack([
        torch.stack([preprocess(synthetic.render(scene, _size(rng), rng))
                     for _ in range(recipe.renders_per_scene)])
        for scene in scenes])

    def on_unnamed(shape: str, color: str | None, count: int) -> torch.Tensor:
        """`count` renders of `shape` filled with `color` (None: an unnamed one) on unnamed backgrounds."""
        out = []
        for _ in range(count):
            background = synthetic.unnamed_color(rng)
            fill = (synthetic.named_color(color, rng) if color
                    else synthetic.unnamed_color(rng, away_from=(background,)))
            out.append(preprocess(synthetic.draw(shape, fill, background,
                                                 synthetic.place(_size(rng), rng), rng)))
        return torch.stack(out)

    count = len(scenes) * recipe.renders_per_scene // len(synthetic.SHAPES)
    shapes = Loose(tokenizer([shape_prompt(shape) for shape in synthetic.SHAPES]),
                   torch.stack([on_unnamed(shape, None, count) for shape in synthetic.SHAPES]),
                   recipe.unnamed_per_shape, captioned=False)
    pairs = [(color, shape) for color in synthetic.COLORS for shape in synthetic.SHAPES]
    colored = Loose(tokenizer([pair_prompt(*pair) for pair in pairs]),
                    torch.stack([on_unnamed(shape, color, count // len(synthetic.COLORS))
                                 for color, shape in pairs]),
                    recipe.on_unnamed_per_pair, captioned=True)
    sets = [_colour_sets(preprocess, tokenizer, recipe, rng)] if recipe.colour_sets else []
    return scenes, images, [shapes, colored, *sets]


def _pick_groups(groups: dict[tuple[str, str], list[int]], recipe: Recipe,
                 rng: random.Random) -> list[tuple[str, str]]:
    """A batch's (colour, background) groups: drawn at random; with `swap_groups`, half of them
    drawn and each joined by its swap ("red on blue" by "blue on red") where that is trained,
    the rest drawn at random. A swapped pair is told apart only by which colour is the
    shape's: what the stand-in got wrong on a pair it never saw (a yellow square on white read
    as a white square)."""
    keys = list(groups)
    if not recipe.swap_groups:
        return rng.sample(keys, recipe.groups_per_batch)
    chosen = set(rng.sample(range(len(keys)), recipe.groups_per_batch // 2))
    for g in sorted(chosen):
        color, background = keys[g]
        if (background, color) in groups and len(chosen) < recipe.groups_per_batch:
            chosen.add(keys.index((background, color)))
    rest = [g for g in range(len(keys)) if g not in chosen]
    chosen |= set(rng.sample(rest, recipe.groups_per_batch - len(chosen)))
    return [keys[g] for g in sorted(chosen)]


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


@contextlib.contextmanager
def _projection_apart(model: torch.nn.Module):
    """A CoCa whose decoder returns its features rather than logits over the whole vocabulary
    (49,408 columns, most of a training step's time), and the projection it leaves out.
    Yields None for a model without a decoder."""
    decoder = getattr(model, "text_decoder", None)
    if decoder is None:
        yield None
        return
    projection = decoder.text_projection
    decoder.text_projection = None  # a None parameter: the decoder skips the projection
    try:
        yield projection
    finally:
        decoder.text_projection = projection


def _caption_loss(features: torch.Tensor, labels: torch.Tensor, projection: torch.Tensor,
                  used: torch.Tensor) -> torch.Tensor:
    """The caption cross-entropy over the whole vocabulary, computed on the used rows: every
    unused row is held at zero, so its logit is exactly 0 and all of them together add
    n_unused · e^0 to the softmax's sum, which one column of log(n_unused) stands for."""
    vocab_size = projection.shape[1]
    logits = features @ projection[:, used]
    rest = logits.new_full((*logits.shape[:-1], 1), math.log(vocab_size - len(used)))
    compact = torch.full((vocab_size,), len(used), dtype=torch.long)  # unused ids: the rest column
    compact[used] = torch.arange(len(used))
    return F.cross_entropy(torch.cat([logits, rest], -1).permute(0, 2, 1), compact[labels],
                           ignore_index=int(compact[PAD_ID]))


def _train(arch: str) -> dict[str, torch.Tensor]:
    recipe = RECIPES[arch]
    log.info("training the offline model %s on synthetic scenes (once)…", arch)
    started = time.monotonic()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # a fixed count: same result on every machine, and it's enough
    try:
        torch.manual_seed(SEED)
        rng = random.Random(SEED)
        model, preprocess = create(arch, output_dict=True)
        captioning = hasattr(model, "text_decoder")
        if captioning:
            # open_clip leaves the CoCa decoder's output projection uninitialised (torch.empty)
            proj = model.text_decoder.text_projection
            torch.nn.init.normal_(proj, std=proj.shape[0] ** -0.5)
        tokenizer = open_clip.get_tokenizer(arch)
        used = used_tokens(tokenizer)
        _confine_to(model, used, tokenizer.vocab_size)
        scenes, images, loose = _training_data(preprocess, tokenizer, recipe, rng)
        captions = tokenizer([s.caption for s in scenes])
        shorts = tokenizer([short_prompt(s) for s in scenes])
        groups: dict[tuple[str, str], list[int]] = {}
        for i, s in enumerate(scenes):
            groups.setdefault((s.color, s.background), []).append(i)

        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.05)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=recipe.lr, total_steps=recipe.steps, pct_start=0.1, cycle_momentum=False)
        bar = tqdm(range(recipe.steps), desc=f"training {arch}", disable=None)
        for _ in bar:
            # whole groups of distinct scenes: colours alone cannot tell the pairs in a batch
            # apart, so shapes must be learned
            idx = torch.tensor([i for g in _pick_groups(groups, recipe, rng) for i in groups[g]])
            renders = torch.randint(recipe.renders_per_scene, (len(idx),))
            short = torch.rand(len(idx)) < recipe.short_prompts
            texts = torch.where(short[:, None], shorts[idx], captions[idx])
            batch_images, batch_texts = zip((images[idx, renders], texts), *(g.sample() for g in loose))
            captioned = torch.cat([torch.ones(len(idx), dtype=torch.bool)]
                                  + [torch.full((len(t),), g.captioned) for g, t in zip(loose, batch_texts[1:])])
            batch_texts = torch.cat(batch_texts)
            with _projection_apart(model) as projection:
                out = model(torch.cat(batch_images), batch_texts)
            losses = {"contrastive": _contrastive_loss(out, batch_texts)}
            if captioning:
                losses["caption"] = _caption_loss(out["logits"][captioned], out["labels"][captioned],
                                                  projection, used)
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
    from clipgram.models import model_cache_dir

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)  # our lines; open_clip's INFO stays out
    cache_dir = model_cache_dir(config.load_config().models.cache_dir)
    for arch in RECIPES:
        path = reship(arch, cache_dir)
        log.info("wrote %s (%.1f MB)", path, path.stat().st_size / 1e6)


if __name__ == "__main__":
    main()
