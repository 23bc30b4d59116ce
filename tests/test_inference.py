"""The model stages' loop: one batch in flight on the device, and the back-off on CUDA OOM."""

import torch

from pipeline import demo, inference, loader, tables
from pipeline.models import clip


def test_a_batch_is_collected_only_after_the_next_one_is_launched(make_config, as_downloaded, tmp_path):
    cfg = make_config(tmp_path / "data", decode={"workers": 0}, embed={"batch_size": 4})
    paths = sorted((demo.SAMPLE_DIR / "images").glob("*.jpg"))[:10]
    as_downloaded(cfg, paths, "a")
    encoder = clip.from_config(cfg.models)
    events = []

    def model_fn(batch):
        n = sum(e[0] == "launch" for e in events) + 1
        events.append(("launch", n))
        vectors = encoder.start_encoding(batch)

        def collect():
            events.append(("collect", n))
            return [{"embedding": v.tolist()} for v in vectors()]
        return collect

    result = inference.run(cfg.data_dir, "embed", "a", tables.EMBEDDINGS, encoder.id, encoder.preprocess,
                           model_fn, device=encoder.device,
                           settings=loader.loader_settings(cfg, "embed", encoder.device), part_rows=100)
    assert result.done == 10
    assert events == [("launch", 1), ("launch", 2), ("collect", 1), ("launch", 3), ("collect", 2),
                      ("collect", 3)]
    stored = tables.connect(cfg.data_dir).execute(
        f"SELECT count(DISTINCT sha256) FROM ({tables.scan_sql(tables.EMBEDDINGS, cfg.data_dir, str(cfg.data_dir), encoder.id)})")
    assert stored.fetchone() == (10,)


def test_out_of_memory_halves_the_batch_until_it_fits_and_keeps_every_row():
    sizes = []

    def model_fn(chunk):
        sizes.append(len(chunk))
        if len(chunk) > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return [{"value": int(v)} for v in chunk]

    call = inference.HalveOnOOM(model_fn, limit=16)
    assert [r["value"] for r in call(torch.arange(10))()] == list(range(10))
    assert sizes[:4] == [10, 8, 4, 2] and call.limit == 2  # then it stays at the size that fit
    assert [r["value"] for r in call(torch.arange(5))()] == list(range(5))
    assert sizes[-3:] == [2, 2, 1]
