import json
from datetime import timezone

import instaloader
import pytest

from pipeline import demo, tables
from pipeline.sources import instagram


def test_recorded_profile_loads_as_real_instaloader_objects(recorded):
    profile, posts = instagram.load_recorded(recorded)
    assert isinstance(profile, instaloader.Profile) and profile.username == demo.ACCOUNT
    assert all(isinstance(p, instaloader.Post) for p in posts)
    assert [p.date_utc for p in posts] == sorted((p.date_utc for p in posts), reverse=True)
    assert {p.typename for p in posts} == {"GraphImage", "GraphSidecar", "GraphVideo"}


def test_scrape_writes_posts_and_one_media_row_per_image(tmp_path, recorded):
    result = instagram.scrape(tmp_path, demo.ACCOUNT, recorded)
    con = tables.connect(tmp_path)
    _, posts = instagram.load_recorded(recorded)
    assert result.done == len(posts) == con.execute("SELECT count(*) FROM posts").fetchone()[0]

    carousel = next(p for p in posts if p.typename == "GraphSidecar")
    rows = con.execute("SELECT position, url FROM media WHERE shortcode = ? ORDER BY position",
                       [carousel.shortcode]).fetchall()
    assert [url for _, url in rows] == [n.display_url for n in carousel.get_sidecar_nodes()]
    assert [pos for pos, _ in rows] == list(range(carousel.mediacount))

    video = next(p for p in posts if p.typename == "GraphVideo")
    assert con.execute("SELECT is_video, url FROM media WHERE shortcode = ?",
                       [video.shortcode]).fetchall() == [(True, video.url)]  # the thumbnail

    post = posts[0]
    row = con.execute("SELECT caption, hashtags, likes, comments, owner_username, taken_at, status "
                      "FROM posts JOIN media USING (account, shortcode) WHERE shortcode = ?",
                      [post.shortcode]).fetchone()
    assert row[:5] == (post.caption, post.caption_hashtags, post.likes, post.comments, demo.ACCOUNT)
    assert row[5] == post.date_utc.replace(tzinfo=timezone.utc)
    assert row[6] == "pending"
    assert post.caption_hashtags  # the sample's captions carry hashtags, as real posts do
    alt = con.execute("SELECT count(*) FROM posts WHERE accessibility_caption IS NOT NULL").fetchone()[0]
    assert alt == sum(p.accessibility_caption is not None for p in posts) > 0


def test_second_scrape_writes_nothing(tmp_path, recorded):
    instagram.scrape(tmp_path, demo.ACCOUNT, recorded)
    parts = sorted((tmp_path / "tables").rglob("*.parquet"))
    assert instagram.scrape(tmp_path, demo.ACCOUNT, recorded).done == 0
    assert sorted((tmp_path / "tables").rglob("*.parquet")) == parts


def test_limit_takes_the_newest_and_paging_stops_at_known_posts(tmp_path, recorded):
    _, posts = instagram.load_recorded(recorded)
    assert instagram.scrape(tmp_path, demo.ACCOUNT, recorded, limit=5).done == 5
    stored = {r[0] for r in tables.connect(tmp_path).execute("SELECT shortcode FROM posts").fetchall()}
    assert stored == {p.shortcode for p in posts[:5]}
    assert instagram.scrape(tmp_path, demo.ACCOUNT, recorded).done == 0  # nothing newer


def test_new_posts_skips_pinned_known_posts_then_stops():
    class P:
        def __init__(self, code):
            self.shortcode = code

    known = {"k1", "k2", "k3", "k4", "k5"}
    # pinned (known) posts first, then a new one, then the known history
    stream = [P(c) for c in ["k1", "k2", "new1", "new2", "k3", "k4", "k5", "old-unknown"]]
    assert [p.shortcode for p in instagram.new_posts(iter(stream), known)] == ["new1", "new2"]


def test_incomplete_recording_fails_loudly_instead_of_calling_instagram(tmp_path, recorded):
    path = next(recorded.glob("*_UTC.json"))
    data = json.loads(path.read_text())
    del data["node"]["edge_media_preview_like"]  # instaloader would fetch full metadata for likes
    path.write_text(json.dumps(data))
    with pytest.raises(instagram.RecordedDataIncomplete, match="instaloader tried to fetch"):
        instagram.scrape(tmp_path, demo.ACCOUNT, recorded)
    assert tables.connect(tmp_path).execute("SELECT count(*) FROM posts").fetchone() == (0,)
