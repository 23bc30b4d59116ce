"""Search the catalog: text→image with CLIP, and BM25 full-text over captions."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import duckdb

from pipeline import catalog
from pipeline.models import clip


class SearchError(RuntimeError):
    pass


@dataclass
class Hit:
    rank: int
    score: float
    account: str
    shortcode: str
    media_id: str
    caption: str
    path: str           # absolute path of the stored image
    permalink: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_HIT_COLUMNS = """i.account, i.shortcode, i.media_id,
    coalesce(i.generated_caption, i.post_caption, '') AS caption, i.path, i.permalink"""


def _hits(rows: list[tuple], data_dir: Path) -> list[Hit]:
    return [
        Hit(rank, float(score), account, shortcode, media_id, caption,
            str(data_dir / path), permalink)
        for rank, (score, account, shortcode, media_id, caption, path, permalink)
        in enumerate(rows, start=1)
    ]


def text_search(con: duckdb.DuckDBPyConnection, data_dir: Path, encoder: clip.ClipEncoder,
                query: str, k: int = 10) -> list[Hit]:
    """Images ranked by cosine similarity of their CLIP embedding to `query`'s."""
    stored = catalog.meta(con).get("clip_model")
    if stored != encoder.id:
        raise SearchError(
            f"the catalog's embeddings are from {stored}, not {encoder.id}: "
            f"search with the same model (--clip-model) or run `clipgram ingest` with this one")
    vector = encoder.encode_text([query])[0].tolist()
    rows = con.execute(f"""
        SELECT array_cosine_similarity(e.embedding, ?::FLOAT[{encoder.dim}]) AS score, {_HIT_COLUMNS}
        FROM images i JOIN embeddings e USING (sha256)
        ORDER BY score DESC, i.media_id LIMIT ?""", [vector, k]).fetchall()
    return _hits(rows, data_dir)


def caption_search(con: duckdb.DuckDBPyConnection, data_dir: Path, query: str,
                   k: int = 10) -> list[Hit]:
    """BM25 over generated captions, post captions, hashtags and alt text."""
    rows = con.execute(f"""
        SELECT d.score, {_HIT_COLUMNS}
        FROM (SELECT media_id, fts_main_documents.match_bm25(media_id, ?) AS score
              FROM documents) d
        JOIN images i USING (media_id)
        WHERE d.score IS NOT NULL
        ORDER BY d.score DESC, i.media_id LIMIT ?""", [query, k]).fetchall()
    return _hits(rows, data_dir)
