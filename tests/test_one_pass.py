"""A run that embeds and captions decodes each image once (inference.run_heads): the embed
stage's pass feeds both models, and its tables are those of the two stages run apart."""

import numpy as np
import pytest

from clipgram import images, loader, tables
from clipgram.config import load_config
from clipgram.models import captioner, clip
from clipgram.stages.caption import caption
from clipgram.stages.embed import embed


@pytest.fixture
def stored(make_config, as_downloaded, sample_paths, tmp_path):
    """Nine sample images and one file that no longer decodes, as downloaded, in two data dirs."""
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(sample_paths[0].read_bytes()[:300])
    paths = [*sample_paths[:9], broken]
    dirs = {}
    for name in ("apart", "together"):
        cfg = make_config(tmp_path / name, decode={"workers": 0}, embed={"batch_size": 4},
                          caption={"batch_size": 4})
        as_downloaded(cfg, paths, "a")
        dirs[name] = cfg
    return dirs


def _rows(cfg, table, model_id):
    """(sha256, embedding or caption, error) of every row written, in sha256 order."""
    value = "embedding" if table is tables.EMBEDDINGS else "caption"
    return tables.connect(cfg.data_dir).execute(
        f"SELECT sha256, {value}, error FROM ({tables.scan_sql(table, cfg.data_dir, str(cfg.data_dir), model_id)}) "
        "ORDER BY sha256").fetchall()


def _with_captions(cfg):
    return load_config(overrides={**cfg.as_dict(), "embed": {"with_captions": True}}, environ={})


def test_one_pass_decodes_each_image_once_and_writes_what_the_two_stages_write(stored, monkeypatch):
    apart, together = stored["apart"], _with_captions(stored["together"])
    encoder = clip.from_config(apart.models)
    model = captioner.from_config(apart.models, apart.caption)
    embed(apart.data_dir, "a", apart)
    caption(apart.data_dir, "a", apart)

    decoded = []
    real = images.load_rgb

    def counted(path, *args, **kwargs):
        decoded.append(path)
        return real(path, *args, **kwargs)
    monkeypatch.setattr(images, "load_rgb", counted)
    result = embed(together.data_dir, "a", together)
    assert len(decoded) == len(set(decoded)) == 10  # every image once, the broken one included
    assert (result.done, result.failed, result.details["captioned"], result.details["decoded"]) == (9, 1, 9, 10)
    assert caption(together.data_dir, "a", together).done == 0  # nothing left for the caption stage

    for table, model_id in ((tables.EMBEDDINGS, encoder.id), (tables.CAPTIONS, model.id)):
        mine, theirs = _rows(together, table, model_id), _rows(apart, table, model_id)
        assert [r[0] for r in mine] == [r[0] for r in theirs] and len(mine) == 10  # a failed row each
        if table is tables.CAPTIONS:
            assert mine == theirs  # same text, same error
        else:
            for (_, a, error_a), (_, b, error_b) in zip(mine, theirs):
                assert error_a == error_b
                assert (a is None) == (b is None) and (a is None or np.allclose(a, b, atol=1e-5))


def test_one_pass_gives_each_model_only_the_images_it_has_pending(stored):
    cfg = stored["together"]
    embed(cfg.data_dir, "a", cfg)  # embeddings of all ten, no captions
    loose = tables.connect(cfg.data_dir).execute("SELECT count(*) FROM embeddings").fetchone()[0]
    result = embed(cfg.data_dir, "a", _with_captions(cfg))
    assert (result.done, result.details["captioned"], result.details["decoded"]) == (0, 9, 10)
    assert tables.connect(cfg.data_dir).execute("SELECT count(*) FROM embeddings").fetchone()[0] == loose


def test_models_that_take_different_inputs_keep_their_own_decodes(stored, caplog):
    cfg = _with_captions(stored["together"])
    model = captioner.from_config(cfg.models, cfg.caption)
    other = captioner.Captioner.__new__(captioner.Captioner)
    other.__dict__.update(model.__dict__)
    other.preprocess = loader.T.Compose([loader.T.Resize(32), *model.preprocess.transforms[1:]])
    with caplog.at_level("INFO", logger="clipgram.embed"):
        result = embed(cfg.data_dir, "a", cfg, captions=other)
    assert "captioned" not in result.details and result.details["decoded"] == 10
    assert "take different inputs" in caplog.text
    assert caption(cfg.data_dir, "a", cfg, model).done == 9  # the caption stage does its own
