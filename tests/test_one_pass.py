"""A run that embeds and captions decodes each image once (inference.run_heads): the embed
stage's pass feeds both models, and its tables are those of the two stages run apart."""

import numpy as np
import pytest

from clipgram import images, loader, tables
from clipgram.config import load_config
from clipgram.models import captioner, clip
from clipgram.stages.caption import caption
from clipgram.stages.embed import embed
from clipgram.stages.ocr import ocr


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


@pytest.fixture
def decodes(monkeypatch):
    """Call it to start counting: the list of paths decoded from then on."""
    def start() -> list:
        decoded = []
        real = images.load_rgb

        def counted(path, *args, **kwargs):
            decoded.append(path)
            return real(path, *args, **kwargs)
        monkeypatch.setattr(images, "load_rgb", counted)
        return decoded
    return start


def _rows(cfg, table, model_id):
    """(sha256, embedding or caption, error) of every row written, in sha256 order."""
    value = "embedding" if table is tables.EMBEDDINGS else "caption"
    return tables.connect(cfg.data_dir).execute(
        f"SELECT sha256, {value}, error FROM ({tables.scan_sql(table, cfg.data_dir, str(cfg.data_dir), model_id)}) "
        "ORDER BY sha256").fetchall()


def _with_captions(cfg):
    return load_config(overrides={**cfg.as_dict(), "embed": {"with_captions": True}}, environ={})


def test_one_pass_decodes_each_image_once_and_writes_what_the_two_stages_write(stored, decodes):
    apart, together = stored["apart"], _with_captions(stored["together"])
    encoder = clip.from_config(apart.models)
    model = captioner.from_config(apart.models, apart.caption)
    embed(apart.data_dir, "a", apart)
    caption(apart.data_dir, "a", apart)

    decoded = decodes()
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


def test_three_models_with_different_inputs_share_one_decode(stored, decodes):
    """CoCa fed a smaller input than CLIP's and OCR its own large one: each image is still
    decoded once, and each model's rows are those its own stage writes from its own decode."""
    ocr_model = pytest.importorskip("clipgram.models.ocr")
    pytest.importorskip("rapidocr_onnxruntime", reason="the OCR extra is not installed")
    apart = stored["apart"]
    together = load_config(overrides={**stored["together"].as_dict(), "ocr": {"max_side": 320},
                                      "embed": {"with_captions": True, "with_ocr": True}}, environ={})
    model = captioner.from_config(apart.models, apart.caption)
    other = captioner.Captioner.__new__(captioner.Captioner)
    other.__dict__.update(model.__dict__)
    other.preprocess = loader.T.Compose([loader.T.Resize(32), *model.preprocess.transforms[1:]])
    reader = ocr_model.from_config(together.ocr)
    encoder = clip.from_config(apart.models)
    embed(apart.data_dir, "a", apart, encoder)
    caption(apart.data_dir, "a", apart, other)
    ocr(apart.data_dir, "a", together, reader)

    decoded = decodes()
    result = embed(together.data_dir, "a", together, encoder, captions=other, reader=reader)
    assert len(decoded) == len(set(decoded)) == 10
    assert (result.done, result.details["captioned"], result.details["read for text"]) == (9, 9, 9)
    assert ocr(together.data_dir, "a", together, reader).done == 0  # nothing left for the ocr stage
    assert _rows(together, tables.CAPTIONS, model.id) == _rows(apart, tables.CAPTIONS, model.id)
    read = [tables.connect(cfg.data_dir).execute(
        f"SELECT sha256, text, lines, error FROM ({tables.scan_sql(tables.OCR, cfg.data_dir, str(cfg.data_dir), reader.id)}) "
        "ORDER BY sha256").fetchall() for cfg in (together, apart)]
    assert read[0] == read[1] and len(read[0]) == 10


def test_a_model_that_fails_as_a_whole_leaves_the_pass_and_its_own_stage_reports_it(stored, monkeypatch):
    """A captioner that fails on every image (a broken install, a lost device): the pass still
    embeds every image; the captions stay pending, and the caption stage, run on its own,
    fails with that model's error, where the ledger and status put it."""
    cfg = _with_captions(stored["together"])
    model = captioner.from_config(cfg.models, cfg.caption)

    def broken(batch):
        raise RuntimeError("the model's weights are corrupt")
    monkeypatch.setattr(model, "caption", broken)
    result = embed(cfg.data_dir, "a", cfg, captions=model)
    assert (result.done, result.failed, result.details["captioned"]) == (9, 1, 0)
    assert "caption left the pass" in result.note
    assert len(_rows(cfg, tables.EMBEDDINGS, clip.from_config(cfg.models).id)) == 10
    (only,) = _rows(cfg, tables.CAPTIONS, model.id)  # the file that does not decode: its failed row
    assert only[1] is None and "truncated" in only[2]
    with pytest.raises(RuntimeError, match="the captioner is at fault"):
        caption(cfg.data_dir, "a", cfg, model)
