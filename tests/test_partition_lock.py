"""Two accounts that share images, embedded at the same moment, write each image once."""

import threading

from clipgram import inference, tables
from clipgram.models import clip
from clipgram.stages.embed import embed


def test_concurrent_accounts_sharing_images_embed_each_once(make_config, as_downloaded, sample_paths, tmp_path,
                                                            monkeypatch):
    cfg = make_config(tmp_path / "data", decode={"workers": 0})
    paths = sample_paths[:8]
    for account in ("first", "second"):  # the same pictures, reposted by two accounts
        as_downloaded(cfg, paths, account)

    # both runs reach their to-do lists before either writes, unless the lock keeps one out
    both_listed = threading.Barrier(2)
    real_pending = inference.pending

    def pending_then_meet(*args, **kwargs):
        todo = real_pending(*args, **kwargs)
        try:
            both_listed.wait(timeout=3)
        except threading.BrokenBarrierError:
            pass  # the other run is waiting for the lock: go on alone
        return todo

    monkeypatch.setattr(inference, "pending", pending_then_meet)
    encoder = clip.from_config(cfg.models)
    results = {}
    runs = [threading.Thread(target=lambda a=a: results.update({a: embed(cfg.data_dir, a, cfg, encoder)}))
            for a in ("first", "second")]
    for run in runs:
        run.start()
    for run in runs:
        run.join(timeout=120)

    raw = tables.scan_sql(tables.EMBEDDINGS, cfg.data_dir, str(cfg.data_dir), encoder.id)
    rows, distinct = tables.connect(cfg.data_dir).execute(
        f"SELECT count(*), count(DISTINCT sha256) FROM ({raw})").fetchone()
    assert rows == distinct == len(paths)
    assert sorted(r.done for r in results.values()) == [0, len(paths)]
