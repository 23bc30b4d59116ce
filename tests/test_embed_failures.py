"""An image the embed stage cannot decode is that image's failed row, with the reason; status
counts it, search never sees it, and a retry takes it up again once the file is good."""

import shutil

from clipgram import catalog, status, tables
from clipgram.models import clip
from clipgram.stages import embed, publish


def test_an_image_that_fails_to_decode_is_a_failed_embedding_row_until_retried(
        make_config, as_downloaded, sample_paths, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(sample_paths[0].read_bytes()[:300])  # its file went bad after download
    paths = [*sample_paths[1:4], broken]
    cfg = make_config(tmp_path / "data", decode={"workers": 0})
    as_downloaded(cfg, paths, "a")
    encoder = clip.from_config(cfg.models)

    result = embed.embed(cfg.data_dir, "a", cfg, encoder)
    assert (result.done, result.failed) == (3, 1)
    rows = tables.connect(cfg.data_dir).execute(
        f"SELECT sha256, embedding IS NULL, error FROM ({tables.scan_sql(tables.EMBEDDINGS, cfg.data_dir, str(cfg.data_dir), encoder.id)})"
    ).fetchall()
    failed = [r for r in rows if r[1]]
    assert len(rows) == 4 and len(failed) == 1 and "truncated" in failed[0][2]
    stage_rows = {r["stage"]: r for r in status.rows(cfg.data_dir, encoder.id, None)}["embed"]
    assert (stage_rows["done"], stage_rows["pending"], stage_rows["failed"]) == (3, 0, 1)
    assert "truncated" in stage_rows["last_error"]
    assert embed.embed(cfg.data_dir, "a", cfg, encoder).done == 0  # a plain rerun: nothing to do

    publish.publish(cfg.data_dir, encoder.id, encoder.dim, None)
    assert catalog.connect(cfg.data_dir).execute("SELECT count(*) FROM embeddings").fetchone() == (3,)

    shutil.copyfile(sample_paths[0], broken)
    retry = make_config(tmp_path / "data", decode={"workers": 0}, embed={"retry_failed": True})
    assert embed.embed(cfg.data_dir, "a", retry, encoder).done == 1
    stage_rows = {r["stage"]: r for r in status.rows(cfg.data_dir, encoder.id, None)}["embed"]
    assert (stage_rows["done"], stage_rows["failed"]) == (4, 0)


def test_parts_written_before_the_error_column_still_read(make_config, as_downloaded, sample_paths, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipgram import inference

    cfg = make_config(tmp_path / "data")
    as_downloaded(cfg, sample_paths[:2], "a")
    old = pa.schema([f for f in tables.EMBEDDINGS.schema if f.name != "error"])
    part = tables.EMBEDDINGS.dir(cfg.data_dir) / "model=m" / "part-old.parquet"
    part.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"sha256": f"{0:064x}", "embedding": [1.0, 0.0]}], schema=old), part)
    assert [sha for sha, _ in inference.pending(cfg.data_dir, tables.EMBEDDINGS, "m", "a", retry_failed=True)] \
        == [f"{1:064x}"]
    stage_rows = {r["stage"]: r for r in status.rows(cfg.data_dir, "m", None)}["embed"]
    assert (stage_rows["done"], stage_rows["pending"], stage_rows["failed"]) == (1, 1, 0)
