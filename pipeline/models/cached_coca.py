"""CoCa caption generation that feeds each step one token, with cached keys and values.

open_clip's `CoCa.generate()` runs the whole prefix through both text towers at
every step, and for beam search encodes each image once per beam. Here each image
is encoded once, its cross-attention keys and values are computed once, and each
step runs only the newest token of every sequence through the unimodal and the
multimodal text towers, attending to the keys and values of the tokens before it.
The arithmetic is open_clip's (the same weights, masks and order of operations),
so the tokens are too: tests/test_caption.py checks both against `generate()`.

Decoding follows `generate()` as well: the same logits processors (a minimum
length of 5 tokens, beam scores that sum raw logits), the search of Hugging Face's
`BeamSearchScorer` (here on the device, so `transformers` is not needed), and
sampling that applies the temperature after top-k/top-p.
open_clip's beam search splits `num_beams` into `num_beam_groups` groups that
never see each other (it passes no diversity penalty), so every group finds the
same beams: searching one group finds the captions at 1/`num_beam_groups` the cost.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

MIN_LENGTH = 5  # tokens before the end token may come (generate()'s min_seq_len)


def supports(model: nn.Module) -> bool:
    """Whether `model` is a CoCa built from the blocks this module mirrors."""
    from open_clip.transformer import ResidualAttentionBlock

    text, decoder = getattr(model, "text", None), getattr(model, "text_decoder", None)
    if text is None or decoder is None or getattr(text, "cls_emb", None) is None:
        return False
    blocks = [*text.transformer.resblocks, *decoder.resblocks, *decoder.cross_attn]
    return (text.attn_mask is not None and text.transformer.batch_first and decoder.batch_first
            and all(type(b) is ResidualAttentionBlock and b.attn._qkv_same_embed_dim
                    and b.attn.batch_first for b in blocks))


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(N, L, D) → (N, heads, L, D / heads)."""
    n, length, width = x.shape
    return x.view(n, length, heads, width // heads).transpose(1, 2)


def _attend(block: nn.Module, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            mask: torch.Tensor | None) -> torch.Tensor:
    """The rest of a ResidualAttentionBlock once its queries, keys and values are known."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = out.transpose(1, 2).reshape(x.shape)
    x = x + block.ls_1(block.attn.out_proj(out))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


class _SelfAttentionCache:
    """One block's keys and values so far, in buffers sized for the whole caption."""

    def __init__(self, block: nn.Module, max_length: int):
        self.block, self.max_length = block, max_length
        self.k = self.v = None

    def step(self, x: torch.Tensor, position: int, mask: torch.Tensor | None) -> torch.Tensor:
        """`x`: (N, 1, D), the token at `position`; `mask`: keys 0…position it may attend to."""
        attn = self.block.attn
        q, k, v = F.linear(self.block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (_heads(t, attn.num_heads) for t in (q, k, v))
        if self.k is None:
            shape = (k.shape[0], k.shape[1], self.max_length, k.shape[3])
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        self.k[:, :, position], self.v[:, :, position] = k[:, :, 0], v[:, :, 0]
        end = position + 1
        return _attend(self.block, x, q, self.k[:, :, :end], self.v[:, :, :end], mask)

    def reorder(self, index: torch.Tensor) -> None:
        if self.k is not None:
            self.k, self.v = self.k[index], self.v[index]


class _CrossAttention:
    """A cross-attention block with the image's keys and values computed once.

    The beams of one image are its queries together, against its keys and values, which
    are never copied per beam (beams never move between images, so reordering them
    leaves these as they are).
    """

    def __init__(self, block: nn.Module, image_embs: torch.Tensor, beams: int):
        self.block, self.beams = block, beams
        attn = block.attn
        w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
        b_q, b_k, b_v = attn.in_proj_bias.chunk(3) if attn.in_proj_bias is not None else (None,) * 3
        self.w_q, self.b_q = w_q, b_q
        kv = block.ln_1_kv(image_embs)
        self.k, self.v = (_heads(F.linear(kv, w, b), attn.num_heads) for w, b in ((w_k, b_k), (w_v, b_v)))

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """`x`: (images × beams, 1, D), each image's beams in a row."""
        q = F.linear(self.block.ln_1(x), self.w_q, self.b_q)
        q = _heads(q.view(x.shape[0] // self.beams, self.beams, -1), self.block.attn.num_heads)
        return _attend(self.block, x, q, self.k, self.v, None)


class Sequences:
    """The text towers of a CoCa over a batch of growing sequences, one token per step."""

    def __init__(self, model: nn.Module, image_embs: torch.Tensor, beams: int, max_length: int):
        text, decoder = model.text, model.text_decoder
        self.text, self.decoder = text, decoder
        self.text_blocks = [_SelfAttentionCache(b, max_length) for b in text.transformer.resblocks]
        self.decoder_blocks = [(_SelfAttentionCache(b, max_length), _CrossAttention(c, image_embs, beams))
                               for b, c in zip(decoder.resblocks, decoder.cross_attn)]
        rows = image_embs.shape[0] * beams
        # which keys of the unimodal tower may be attended to: open_clip masks pad tokens there
        # (and, for weights trained with its original mask, shifted by the class token)
        self.valid = torch.ones(rows, max_length, dtype=torch.bool, device=image_embs.device)
        self.previous: torch.Tensor | None = None
        self.position = 0

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append `tokens` (N,) to the sequences; return the logits for the token after them."""
        text, t = self.text, self.position
        if getattr(text, "correct_cls_mask", False):
            self.valid[:, t] = tokens != text.pad_id
        elif self.previous is not None:
            self.valid[:, t] = self.previous != text.pad_id
        mask = self.valid[:, None, None, :t + 1]
        cast = text.transformer.get_cast_dtype()
        x = text.token_embedding(tokens[:, None]).to(cast) + text.positional_embedding[t].to(cast)
        for block in self.text_blocks:
            x = block.step(x, t, mask)
        for self_attention, cross_attention in self.decoder_blocks:
            x = cross_attention.step(self_attention.step(x, t, None))  # causal: only past keys exist
        self.previous, self.position = tokens, t + 1
        return (self.decoder.ln_final(x) @ self.decoder.text_projection)[:, 0]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the sequences at `index` (beam search's choice of which beams go on)."""
        for block in self.text_blocks:
            block.reorder(index)
        for self_attention, _ in self.decoder_blocks:
            self_attention.reorder(index)
        self.valid, self.previous = self.valid[index], self.previous[index]


@dataclass(frozen=True)
class Tokens:
    """The special tokens generation needs."""

    start: int
    end: int
    pad: int


def _forbid_early_end(logits: torch.Tensor, length: int, tokens: Tokens) -> torch.Tensor:
    if length < MIN_LENGTH:
        logits = logits.clone()
        logits[:, tokens.end] = float("-inf")
    return logits


class _Finished:
    """Each image's best `beams` ended captions so far (a beam-search hypothesis list), on the device.

    A caption's score is its summed logits over its length; a candidate takes a place
    when there is room or it beats the worst, as Hugging Face's BeamHypotheses has it.
    Exact ties between different captions may be broken the other way.
    """

    def __init__(self, batch: int, beams: int, max_length: int, device: torch.device):
        self.scores = torch.full((batch, beams), float("-inf"), device=device)
        self.ids = torch.zeros((batch, beams, max_length), dtype=torch.long, device=device)
        self.lengths = torch.zeros((batch, beams), dtype=torch.long, device=device)

    def add(self, scores: torch.Tensor, ids: torch.Tensor) -> None:
        """Offer (B, k) candidates, `scores` already length-normalised (-inf: none), `ids` (B, k, L)."""
        batch, k, length = ids.shape
        padded = torch.zeros((batch, k, self.ids.shape[2]), dtype=torch.long, device=ids.device)
        padded[:, :, :length] = ids
        pool_scores = torch.cat([self.scores, scores], dim=1)
        pool_ids = torch.cat([self.ids, padded], dim=1)
        pool_lengths = torch.cat([self.lengths, torch.full_like(scores, length, dtype=torch.long)], dim=1)
        self.scores, keep = torch.topk(pool_scores, self.scores.shape[1], dim=1)
        self.ids = pool_ids[torch.arange(batch, device=ids.device)[:, None], keep]
        self.lengths = pool_lengths.gather(1, keep)

    def full(self) -> torch.Tensor:
        return torch.isfinite(self.scores).all(dim=1)

    def worst(self) -> torch.Tensor:
        return self.scores.min(dim=1).values


@torch.inference_mode()
def beam_search(model: nn.Module, images: torch.Tensor, *, max_length: int, num_beams: int,
                tokens: Tokens) -> torch.Tensor:
    """(B, 3, H, W) images → (B, L ≤ max_length) token ids, as generate(generation_type="beam_search")
    with `num_beams` beams in one group.

    The search of Hugging Face's BeamSearchScorer (which generate() uses, with a length
    penalty of 1 and no early stopping), all on the device: its per-candidate Python loop
    would wait for the device hundreds of times a step. One wait a step remains, to stop.
    """
    batch, beams, device = images.shape[0], num_beams, images.device
    _, image_embs = model._encode_image(images)
    sequences = Sequences(model, image_embs, beams, max_length)
    ids = torch.full((batch * beams, 1), tokens.start, dtype=torch.long, device=device)
    scores = torch.full((batch, beams), -1e9, device=device)
    scores[:, 0] = 0  # one live beam per image to start with: the others would repeat it
    finished = _Finished(batch, beams, max_length, device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    first_row = torch.arange(batch, device=device)[:, None] * beams  # each image's first beam
    while True:
        length = ids.shape[1] + 1  # with the token this step chooses
        logits = _forbid_early_end(sequences.step(ids[:, -1]).float(), ids.shape[1], tokens)
        vocab = logits.shape[-1]
        top_scores, top = torch.topk((logits + scores.view(-1, 1)).view(batch, -1), 2 * beams, dim=1)
        top_tokens, top_rows = top % vocab, first_row + top // vocab
        ends = top_tokens == tokens.end
        # an end among the top `beams` candidates finishes a caption (without the end token)
        ending = ends[:, :beams] & ~done[:, None]
        finished.add(torch.where(ending, top_scores[:, :beams] / length, float("-inf")),
                     ids[top_rows[:, :beams]])
        # the best `beams` candidates that do not end go on (there are always enough of them)
        go_on = ~ends & ((~ends).cumsum(dim=1) <= beams)
        rank = torch.arange(2 * beams, device=device)  # sorted, not nonzero(): no wait for the device
        chosen = torch.where(go_on, rank, rank + 2 * beams).argsort(dim=1)[:, :beams]
        scores = top_scores.gather(1, chosen)
        rows, next_tokens = top_rows.gather(1, chosen), top_tokens.gather(1, chosen)
        # an image whose worst finished caption beats anything its beams could still reach is done
        done |= finished.full() & (finished.worst() >= top_scores[:, 0] / length)
        scores = torch.where(done[:, None], 0.0, scores)
        next_tokens = torch.where(done[:, None], tokens.pad, next_tokens)
        rows = torch.where(done[:, None], first_row, rows).view(-1)
        ids = torch.cat([ids[rows], next_tokens.view(-1, 1)], dim=-1)
        sequences.reorder(rows)
        if ids.shape[1] >= max_length or bool(done.all()):
            break
    # images still searching: their beams, as they stand, are candidates too
    open_ = ~done[:, None].expand(batch, beams)
    finished.add(torch.where(open_, scores / ids.shape[1], float("-inf")), ids.view(batch, beams, -1))
    best = finished.scores.argmax(dim=1)
    picked = torch.arange(batch, device=device)
    lengths = finished.lengths[picked, best]
    width = min(int(lengths.max()) + 1, max_length)
    columns = torch.arange(width, device=device)
    out = torch.where(columns < lengths[:, None], finished.ids[picked, best, :width], tokens.pad)
    return torch.where(columns == lengths[:, None], tokens.end, out)  # ended, where there is room


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Logits outside the k largest → -inf (Hugging Face's TopKLogitsWarper)."""
    kth = torch.topk(logits, min(max(k, 1), logits.shape[-1]))[0][..., -1, None]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Logits outside the smallest set holding probability `p` → -inf (TopPLogitsWarper)."""
    ascending, order = torch.sort(logits, descending=False)
    drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= (1 - p)
    drop[..., -1:] = False  # the likeliest token always stays
    return logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))


@torch.inference_mode()
def sample(model: nn.Module, images: torch.Tensor, *, max_length: int,
           keep: Callable[[torch.Tensor], torch.Tensor], temperature: float, tokens: Tokens) -> torch.Tensor:
    """(B, 3, H, W) images → (B, L ≤ max_length) token ids, as generate(generation_type="top_k"/"top_p"),
    `keep` filtering each step's logits (top_k_filter or top_p_filter)."""
    batch = images.shape[0]
    _, image_embs = model._encode_image(images)
    sequences = Sequences(model, image_embs, 1, max_length)
    out = torch.full((batch, 1), tokens.start, dtype=torch.long, device=images.device)
    while True:
        ended = (out[:, -1] == tokens.end) | (out[:, -1] == tokens.pad)
        if ended.all():
            break  # before the step: its logits would go unused
        logits = sequences.step(out[:, -1])
        live = ~ended
        filtered = keep(_forbid_early_end(logits[live], out.shape[1], tokens))
        probs = F.softmax(filtered / temperature, dim=-1)
        nxt = torch.full((batch, 1), tokens.pad, dtype=torch.long, device=images.device)
        nxt[live] = tokens.end if out.shape[1] + 1 == max_length else torch.multinomial(probs, 1)
        out = torch.cat([out, nxt], dim=-1)
        if out.shape[1] >= max_length:
            break
    return out
