"""The caption stage: one image's failure is recorded and costs only its own caption; the
[caption] decoding settings reach CoCa's generate()."""

import random
import sys

import pytest
import torch
from PIL import Image

from clipgram import synthetic, tables
from clipgram.config import ConfigError, load_config
from clipgram.models import cached_coca, captioner, resolve, tiny
from clipgram.stages.caption import caption


@pytest.fixture
def account(make_config, as_downloaded, sample_paths, tmp_path):
    """Six stored images: five of the sample profile and one black one."""
    black = tmp_path / "black.jpg"
    Image.new("RGB", (128, 128)).save(black)
    paths = [*sample_paths[:5], black]
    cfg = make_config(tmp_path / "data", decode={"workers": 0}, caption={"batch_size": 4})
    as_downloaded(cfg, paths, "a")
    return cfg, f"{len(paths) - 1:064x}"  # the black image's sha256 (as_downloaded numbers them)


def _fail_on_black_images(monkeypatch, model):
    """Generation raising for any batch that holds a black image."""
    real, calls = model.generate, []

    def generate(images):
        calls.append(len(images))
        if (images.flatten(1).mean(1) < -1.5).any():
            raise ValueError("no caption for this one")
        return real(images)
    monkeypatch.setattr(model, "generate", generate)
    return calls


def _captions(cfg, model_id):
    return {sha: (text, error) for sha, text, error in tables.connect(cfg.data_dir).execute(
        f"SELECT sha256, caption, error FROM ({tables.latest_sql(tables.CAPTIONS, cfg.data_dir, str(cfg.data_dir), model_id)})"
    ).fetchall()}


def test_an_image_whose_captioning_fails_is_recorded_and_the_batch_goes_on(account, monkeypatch):
    cfg, black = account
    model = captioner.from_config(cfg.models, cfg.caption)
    calls = _fail_on_black_images(monkeypatch, model)
    result = caption(cfg.data_dir, "a", cfg)
    assert (result.done, result.failed) == (5, 1)
    assert calls == [4, 2, 1, 1]  # the failed batch again, one image at a time
    stored = _captions(cfg, model.id)
    assert stored[black] == (None, "captioning failed: ValueError: no caption for this one")
    assert all(text and error is None for sha, (text, error) in stored.items() if sha != black)

    monkeypatch.undo()  # the fault is gone: a retry captions the image that failed, and only it
    retry = load_config(overrides={**cfg.as_dict(), "caption": {"retry_failed": True}}, environ={})
    assert caption(cfg.data_dir, "a", retry).done == 1
    assert _captions(cfg, model.id)[black][0]


def test_a_batch_of_one_image_that_fails_is_recorded_too(account, monkeypatch):
    cfg, black = account
    cfg = load_config(overrides={**cfg.as_dict(), "caption": {"batch_size": 5}}, environ={})
    model = captioner.from_config(cfg.models, cfg.caption)
    calls = _fail_on_black_images(monkeypatch, model)
    result = caption(cfg.data_dir, "a", cfg)
    assert calls == [5, 1] and (result.done, result.failed) == (5, 1)  # the black image comes last
    assert _captions(cfg, model.id)[black][1] == "captioning failed: ValueError: no caption for this one"


def test_a_captioner_that_fails_on_every_image_stops_the_stage_and_keeps_what_was_done(account, monkeypatch):
    cfg, black = account
    model = captioner.from_config(cfg.models, cfg.caption)
    real = model.generate
    calls = []

    def generate(images):  # the first batch works, then the model breaks down
        calls.append(len(images))
        if len(calls) > 1:
            raise RuntimeError("the model broke")
        return real(images)
    monkeypatch.setattr(model, "generate", generate)
    with pytest.raises(RuntimeError, match="the model broke, for every image of a batch of 2"):
        caption(cfg.data_dir, "a", cfg)
    stored = _captions(cfg, model.id)
    assert len(stored) == 4 and all(text for text, _ in stored.values())  # the first batch's captions
    monkeypatch.undo()
    assert caption(cfg.data_dir, "a", cfg).done == 2  # a rerun does only the rest


@pytest.fixture(scope="module")
def coca(tiny_coca_ckpt):
    return resolve.resolve("tiny", default="unused", tiny_arch=tiny.TINY_COCA, cache_dir=tiny_coca_ckpt.parent)


def _renders(model, count, seed=0):
    rng = random.Random(seed)
    return torch.stack([model.preprocess(synthetic.render(rng.choice(synthetic.all_scenes()), 64, rng))
                        for _ in range(count)])


def _sampled(model, batch, seed):
    torch.manual_seed(seed)
    return model.caption(batch)


def test_decoding_settings_reach_generate(coca):
    def make(**decoding):
        return captioner.Captioner(coca, torch.device("cpu"), decoding=captioner.Decoding(**decoding))
    greedy = make(method="top_k", top_k=1)
    batch = _renders(greedy, 6)
    # top-k of 1 is greedy whatever the seed; sampling from all tokens, hot, is not
    assert _sampled(greedy, batch, 0) == _sampled(greedy, batch, 1)
    hot = make(method="top_k", top_k=1000, temperature=3.0)
    assert _sampled(hot, batch, 0) != _sampled(hot, batch, 1)
    short = make(method="top_k", top_k=1, max_length=6)  # at most 4 words between start and end
    assert all(len(text.split()) <= 4 for text in short.caption(batch))
    assert max(len(text.split()) for text in greedy.caption(batch)) > 4
    two_beams = make(num_beams=2, beam_groups=1)
    assert all(two_beams.caption(batch))


@pytest.mark.parametrize("values, message", [
    ({"num_beams": 4, "beam_groups": 3}, "caption.beam_groups \\(3\\) must divide caption.num_beams \\(4\\)"),
    ({"max_length": 5}, "caption.max_length: expected a value from 6"),
    ({"num_beams": 1, "beam_groups": 1}, "caption.num_beams: expected a value from 2"),
    ({"top_p": 1.5}, "caption.top_p: expected a value from"),
])
def test_decoding_settings_that_generate_cannot_take_are_refused(values, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides={"caption": values}, environ={})


@pytest.mark.parametrize("correct_cls_mask", [False, True])
def test_each_cached_step_gives_the_logits_of_a_full_forward(coca, correct_cls_mask, monkeypatch):
    """Token by token through the cached towers equals open_clip's forward over the whole prefix,
    pad tokens (which the unimodal tower masks) included."""
    model = captioner.Captioner(coca, torch.device("cpu")).model
    monkeypatch.setattr(model.text, "correct_cls_mask", correct_cls_mask)
    images = _renders(captioner.Captioner(coca, torch.device("cpu")), 3)
    text = torch.randint(1, 49406, (3, 12))
    text[:, 0] = 49406
    text[0, 3] = text[1, 5:7] = model.text.pad_id
    with torch.inference_mode():
        latent, embs = model._encode_image(images)
        full = model(images, text, image_latent=latent, image_embs=embs, output_labels=False)["logits"]
        sequences = cached_coca.Sequences(model, embs, 1, text.shape[1])
        stepped = torch.stack([sequences.step(text[:, t]) for t in range(text.shape[1])], dim=1)
    torch.testing.assert_close(stepped, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("decoding, cached", [
    ({}, True),                                       # beam search: 6 beams in 3 groups
    ({"num_beams": 4, "beam_groups": 1}, True),
    ({"num_beams": 3, "beam_groups": 3}, True),       # one beam a group
    ({"max_length": 7}, True),                        # many captions cut off at the limit
    ({"method": "top_k", "top_k": 1}, True),          # greedy
    ({"method": "top_p", "top_p": 0.9}, True),        # sampled: the same draws from the same seed
])
def test_the_cached_decoder_gives_open_clips_tokens(coca, decoding, cached):
    model = captioner.Captioner(coca, torch.device("cpu"), decoding=captioner.Decoding(**decoding))
    reference = captioner.Captioner(coca, torch.device("cpu"),
                                    decoding=captioner.Decoding(**decoding, decoder="open_clip"))
    assert model.cached is cached and not reference.cached
    images = _renders(model, 16)
    with torch.inference_mode():
        torch.manual_seed(0)
        ours = model.generate(images)
        torch.manual_seed(0)
        theirs = reference.generate(images)
    assert torch.equal(ours, theirs)


def test_the_cached_decoder_under_autocast_mostly_agrees_with_open_clips(coca):
    """bf16 autocast (what CUDA gets) rounds each path a little differently: near-ties may go
    another way, so captions may differ a little, not much."""
    ours = captioner.Captioner(coca, torch.device("cpu"), precision="bf16")
    reference = captioner.Captioner(coca, torch.device("cpu"), precision="bf16",
                                    decoding=captioner.Decoding(decoder="open_clip"))
    images = _renders(ours, 32, seed=1)
    agree = sum(a == b for a, b in zip(ours.caption(images), reference.caption(images)))
    assert agree >= 24


def test_only_open_clips_generate_needs_transformers(coca, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed: import fails
    images = _renders(captioner.Captioner(coca, torch.device("cpu")), 2)
    assert all(captioner.Captioner(coca, torch.device("cpu")).caption(images))
    with pytest.raises(RuntimeError, match="needs `transformers`: pip install"):
        captioner.Captioner(coca, torch.device("cpu"), decoding=captioner.Decoding(decoder="open_clip"))
