"""The model stages' loop: one batch in flight on the device, the batch-size probe, and the
back-off on CUDA OOM."""

from dataclasses import replace

import pytest
import torch

from clipgram import inference, loader, tables
from clipgram.models import clip


def test_a_batch_is_collected_only_after_the_next_one_is_launched(make_config, as_downloaded, sample_paths,
                                                                  tmp_path):
    cfg = make_config(tmp_path / "data", decode={"workers": 0}, embed={"batch_size": 4})
    paths = sample_paths[:10]
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


def _timed_like(fits_up_to, seconds_of):
    """A device stand-in for `largest_batch`: batches above `fits_up_to` do not fit."""
    tried = []

    def seconds_for(n):
        tried.append(n)
        return seconds_of(n) if n <= fits_up_to else None
    return seconds_for, tried


def test_the_batch_size_probe_grows_until_a_batch_does_not_fit():
    seconds_for, tried = _timed_like(300, lambda n: 0.01 + n / 1000)  # faster per image as it grows
    assert inference.largest_batch(seconds_for, 64, 1024) == 256
    assert tried == [64, 128, 256, 512]


def test_the_batch_size_probe_stops_where_bigger_batches_are_slower():
    # saturated from 128 on: the same images/s up to 256, slower past it
    seconds_for, tried = _timed_like(4096, lambda n: max(n, 128) / 1000 if n <= 256 else n / 700)
    assert inference.largest_batch(seconds_for, 64, 1024) == 256
    assert tried == [64, 128, 256, 512]


def test_the_batch_size_probe_stops_at_its_limit():
    seconds_for, tried = _timed_like(4096, lambda n: 0.01 + n / 1000)
    assert inference.largest_batch(seconds_for, 64, 256) == 256 and tried == [64, 128, 256]


def test_the_batch_size_probe_halves_a_start_that_does_not_fit_and_then_stays_below_it():
    seconds_for, tried = _timed_like(20, lambda n: 0.01 + n / 1000)
    assert inference.largest_batch(seconds_for, 64, 1024) == 16
    assert tried == [64, 32, 16]
    seconds_for, _ = _timed_like(0, lambda n: 1.0)
    with pytest.raises(RuntimeError, match="not even one image fits"):
        inference.largest_batch(seconds_for, 4, 16)


def test_an_auto_batch_size_is_probed_on_the_stages_images_and_then_used(make_config, as_downloaded,
                                                                          sample_paths, tmp_path, monkeypatch):
    """The probe runs the real model on copies of a stored image; the stage then runs at its size."""
    monkeypatch.setattr(inference, "_probed", {})
    now = [0.0]  # a device's clock: a fixed cost per batch and one per image, so bigger batches pay
    monkeypatch.setattr(inference, "_clock", lambda: now[0])
    cfg = make_config(tmp_path / "data", decode={"workers": 0})
    paths = sample_paths[:20]
    as_downloaded(cfg, paths, "a")
    encoder = clip.from_config(cfg.models)
    sizes = []

    def model_fn(batch):
        sizes.append(len(batch))
        if len(batch) > 8:  # stands in for CUDA's memory limit
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        now[0] += 0.05 + 0.001 * len(batch)
        vectors = encoder.start_encoding(batch)
        return lambda: [{"embedding": v} for v in vectors()]

    settings = replace(loader.loader_settings(cfg, "embed", encoder.device), batch_size=2, probe_batch=64)
    result = inference.run(cfg.data_dir, "embed", "a", tables.EMBEDDINGS, encoder.id, encoder.preprocess,
                           model_fn, device=encoder.device, settings=settings, part_rows=100)
    assert result.done == 20
    assert sizes[:7] == [2, 2, 4, 4, 8, 8, 16]  # each size twice (the second timed), until one does not fit
    assert sizes[7:] == [8, 8, 4]  # the run: 20 images at the probed size, no out-of-memory
    assert inference._probed[("embed", encoder.id, "cpu")] == 8


def test_allocation_failures_that_libraries_report_as_runtime_errors_also_halve_the_batch():
    def model_fn(chunk):
        if len(chunk) > 2:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)")
        return [{"value": int(v)} for v in chunk]

    call = inference.HalveOnOOM(model_fn, limit=8)
    assert [r["value"] for r in call(torch.arange(6))()] == list(range(6)) and call.limit == 2

    def broken(chunk):
        raise RuntimeError("an image is bad")
    with pytest.raises(RuntimeError, match="an image is bad"):  # any other error is no memory problem
        inference.HalveOnOOM(broken, limit=8)(torch.arange(4))


def test_another_model_embeds_into_a_partition_of_its_own_and_leaves_the_first_untouched(
        make_config, as_downloaded, sample_paths, tmp_path):
    from clipgram.models import tiny
    from clipgram.stages.embed import embed

    cfg = make_config(tmp_path / "data", decode={"workers": 0})
    as_downloaded(cfg, sample_paths[:6], "a")
    assert embed(cfg.data_dir, "a", cfg).done == 6
    stored = tables.EMBEDDINGS.dir(cfg.data_dir)
    before = {p: p.read_bytes() for p in stored.rglob("*.parquet")}

    # the same architecture with other weights, from a local checkpoint: another model id
    torch.manual_seed(1)
    weights = tmp_path / "other.pt"
    torch.save(tiny.create(tiny.TINY_CLIP)[0].state_dict(), weights)
    other = make_config(tmp_path / "data", decode={"workers": 0},
                        models={"clip": f"{tiny.TINY_CLIP}:{weights}"})
    assert embed(other.data_dir, "a", other).done == 6
    assert embed(other.data_dir, "a", other).done == 0  # and only once
    ids = [clip.from_config(c.models).id for c in (cfg, other)]
    assert ids[0] != ids[1]
    assert {p.name for p in stored.iterdir()} == {f"model={i}" for i in ids}
    assert {p: p.read_bytes() for p in before} == before  # the first model's parts as they were

    def vectors(model_id):
        rows = tables.connect(cfg.data_dir).execute(
            f"SELECT sha256, embedding FROM ({tables.scan_sql(tables.EMBEDDINGS, cfg.data_dir, str(cfg.data_dir), model_id)}) ORDER BY sha256").fetchall()
        return [sha for sha, _ in rows], torch.tensor([v for _, v in rows])
    (shas_a, a), (shas_b, b) = vectors(ids[0]), vectors(ids[1])
    assert shas_a == shas_b and not torch.allclose(a, b, atol=1e-3)


def test_a_to_do_list_of_one_batch_is_decoded_without_starting_workers(make_config, as_downloaded,
                                                                       sample_paths, tmp_path, monkeypatch):
    from clipgram.stages.embed import embed

    started = []
    real = loader.worker_context
    monkeypatch.setattr(loader, "worker_context", lambda: started.append(1) or real())
    cfg = make_config(tmp_path / "data", decode={"workers": 1}, embed={"batch_size": 8})
    paths = sample_paths
    as_downloaded(cfg, paths[:8], "small")
    assert embed(cfg.data_dir, "small", cfg).done == 8 and not started
    as_downloaded(cfg, paths[:20], "larger")  # 12 not embedded yet (images are keyed by content)
    assert embed(cfg.data_dir, "larger", cfg).done == 12 and started
