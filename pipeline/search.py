"""Search the catalog: CLIP text/image vectors, BM25 over captions, and both fused.

A query is weighted arithmetic over terms: `"2:golden retriever" + photo.jpg - "fruit"`
is 2·text("golden retriever") + image(photo.jpg) − text("fruit"), normalised.
Quoted terms are text; an unquoted term naming an image file is an image; a
plain query without quotes or ` + ` / ` - ` is one text term.

Vectors are scored against a memory-mapped float32 matrix that `publish`
writes beside the catalog (one row per searchable image, `search_rows` maps
rows to media ids): a matrix product, instead of a scan of Parquet.

Hybrid search (the default for a text query when captions exist) fuses the
CLIP ranking and the BM25 ranking by reciprocal rank fusion:
score(image) = Σ over the two rankings of 1 / (RRF_K + rank), rank counted
from 1 and taken within the top `max(RRF_POOL, k)` of each ranking; an image
missing from one ranking gets nothing from it. RRF needs no score calibration
between cosine and BM25, and RRF_K = 60 is the constant of Cormack et al. (2009).

Filters (`Filters`) become one SQL predicate over the `images` view, applied
before ranking, so a filtered top-k is the top-k of the filtered images.
"""

from __future__ import annotations

import mmap
import re
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import duckdb
import numpy as np
import pyarrow as pa

from clipgram import ann, catalog, images, storage
from clipgram.errors import ClipgramError

if TYPE_CHECKING:  # the encoder comes from the caller: searching loads no model itself
    from clipgram.models import clip, query_encoder

    # a text-only query needs only the text tower (query_encoder); images need the whole model
    Encoder = clip.ClipEncoder | query_encoder.QueryEncoder

RRF_K = 60
RRF_POOL = 100
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic"}


class SearchError(ClipgramError, RuntimeError):
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
    match: bool | None = None  # judged to match a text query (analysis/relevance.py); None: not judged

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- the query: weighted terms ----------------------------------------------------------------

@dataclass(frozen=True)
class Term:
    kind: str           # text | image | like (a stored image, by media id)
    value: str
    weight: float = 1.0


_WEIGHT = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*:(.+)$", re.DOTALL)
_OPERATOR = re.compile(r"\s+([+-])\s+")


def _term(raw: str, quoted: bool, sign: float, files: bool) -> Term:
    weight, value = 1.0, raw.strip()
    if (m := _WEIGHT.match(value)) is not None:
        weight, value = float(m.group(1)), m.group(2).strip()
    if not value:
        raise SearchError(f"empty term in query near {raw!r}")
    if files and not quoted and Path(value).suffix.lower() in IMAGE_SUFFIXES:
        if not Path(value).expanduser().is_file():
            raise SearchError(f"image {value} not found: give an existing file, or quote the text")
        return Term("image", str(Path(value).expanduser()), sign * weight)
    return Term("text", value, sign * weight)


def parse_query(query: str, files: bool = True) -> list[Term]:
    """`"2:a dog" + photo.jpg - "fruit"` → [Term(text, a dog, 2), Term(image, …), Term(text, fruit, -1)].

    With `files` off (a query from the network), a term never names a file: it is text."""
    terms: list[Term] = []
    rest, sign = query.strip(), 1.0
    while rest:
        if rest[0] in "\"'":
            end = rest.find(rest[0], 1)
            if end < 0:
                raise SearchError(f"unclosed quote in query: {query!r}")
            terms.append(_term(rest[1:end], True, sign, files))
            rest = rest[end + 1:]
        else:
            m = _OPERATOR.search(rest)
            terms.append(_term(rest[:m.start()] if m else rest, False, sign, files))
            rest = rest[m.start():] if m else ""
        rest = rest.strip()
        if rest:
            if rest[0] not in "+-":
                raise SearchError(f"expected + or - between terms in {query!r}, at {rest!r}")
            sign, rest = (1.0 if rest[0] == "+" else -1.0), rest[1:].strip()
    if not terms:
        raise SearchError("empty query: give text, an image file, --image or --like")
    return terms


# --- filters: one predicate over `images`, with bound parameters --------------------------------

# Statements and table functions a filter predicate has no business with.
_FORBIDDEN_WORDS = {
    "drop", "attach", "detach", "copy", "install", "load", "create", "insert", "update", "delete",
    "alter", "pragma", "set", "reset", "call", "export", "import", "checkpoint", "vacuum", "use",
    "truncate", "begin", "commit", "rollback", "transaction", "grant", "revoke", "union",
    "intersect", "except", "into", "summarize", "describe", "show",
    "glob", "query", "query_table", "sniff_csv", "parquet_scan", "getenv", "current_setting",
}
_FORBIDDEN_PREFIXES = ("read_", "parquet_", "duckdb_")


def validate_where(predicate: str) -> str:
    """A user's `--where` if it is a plain boolean expression; SearchError saying why if not."""
    try:
        tokens = duckdb.tokenize(predicate)
    except duckdb.Error as e:
        raise SearchError(f"--where does not parse: {e}") from None
    ends = [start for start, _ in tokens[1:]] + [len(predicate)]
    depth = 0
    for (start, kind), end in zip(tokens, ends):
        text = predicate[start:end].strip()
        if kind == duckdb.token_type.comment:
            raise SearchError("--where: comments are not allowed in a filter")
        if kind == duckdb.token_type.operator:
            depth += text.count("(") - text.count(")")
            if ";" in text or depth < 0:
                raise SearchError("--where must be one filter expression (no ';', balanced parentheses)")
        word = text.lower().strip('"')
        if kind in (duckdb.token_type.keyword, duckdb.token_type.identifier) and (
                word in _FORBIDDEN_WORDS or word.startswith(_FORBIDDEN_PREFIXES)):
            raise SearchError(f"--where is a filter over the images view: {text.upper()} is not allowed "
                              f"(use columns such as account, likes, taken_at, hashtags, post_caption)")
    if depth != 0:
        raise SearchError("--where: unbalanced parentheses")
    code = "".join(predicate[start:end] for (start, kind), end in zip(tokens, ends)
                   if kind != duckdb.token_type.string_const)
    if "--" in code or "/*" in code or ";" in code:
        raise SearchError("--where must be one filter expression (no ';', no comments)")
    try:
        statements = duckdb.connect().extract_statements(
            f"SELECT media_id FROM images WHERE ({predicate})") if predicate.strip() else []
    except duckdb.Error as e:
        raise SearchError(f"--where does not parse: {e}") from None
    if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
        raise SearchError("--where must be a single boolean expression over the images view")
    return predicate


@dataclass
class Filters:
    accounts: list[str] = field(default_factory=list)
    since: date | None = None
    until: date | None = None           # inclusive: the whole day
    hashtags: list[str] = field(default_factory=list)   # every one must be on the post
    min_likes: int | None = None
    labels: list[tuple[str, str]] = field(default_factory=list)  # (label set, label) ranked first
    has_text: bool | None = None        # text read in the image (ocr stage): True with, False without
    where: str | None = None            # validated SQL predicate over `images`

    def __bool__(self) -> bool:
        return any(vars(self).values()) or self.has_text is not None

    def media_sql(self) -> tuple[str, list[Any]]:
        """`SELECT media_id FROM images WHERE …` selecting the images that pass, and its parameters."""
        clauses, params = ["true"], []
        if self.accounts:
            clauses.append("list_contains(?::VARCHAR[], account)")
            params.append(self.accounts)
        if self.since:
            clauses.append("taken_at >= ?::DATE")
            params.append(self.since)
        if self.until:
            clauses.append("taken_at < ?::DATE + INTERVAL 1 DAY")
            params.append(self.until)
        if self.hashtags:
            clauses.append("list_has_all(list_transform(hashtags, t -> lower(t)), ?::VARCHAR[])")
            params.append([t.lstrip("#").lower() for t in self.hashtags])
        if self.min_likes is not None:
            clauses.append("likes >= ?")
            params.append(self.min_likes)
        for label_set, label in self.labels:
            clauses.append("sha256 IN (SELECT sha256 FROM labels WHERE label_set = ? AND label = ? "
                           "AND rank = 1)")
            params += [label_set, label]
        if self.has_text is not None:
            clauses.append(f"coalesce(ocr_text, '') {'<>' if self.has_text else '='} ''")
        if self.where:
            clauses.append(f"({validate_where(self.where)})")
        return f"SELECT media_id FROM images WHERE {' AND '.join(clauses)}", params


def parse_label_filter(text: str) -> tuple[str, str]:
    """`SET=LABEL` → (SET, LABEL)."""
    label_set, sep, label = text.partition("=")
    if not sep or not label_set.strip() or not label.strip():
        raise SearchError(f"--label expects SET=LABEL (e.g. shape=circle), got {text!r}")
    return label_set.strip(), label.strip()


# --- the vector index: a memory-mapped matrix ---------------------------------------------------

def write_matrix(path: Path, count: int, dim: int, batches: Iterable[pa.RecordBatch]) -> Path:
    """Stream FLOAT[dim] batches (first column) into a float32 .npy at `path`, atomically.

    Plain writes, not a memory map: a disk that fills up then raises ENOSPC (one line, and
    the rerun finishes) where stores into a mapped sparse file would kill the process (SIGBUS).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
              "shape": (count, dim)}
    row = 0
    with storage.replacing(path, to_store=False) as tmp, open(tmp, "wb") as f:  # each machine builds its own
        np.lib.format.write_array_header_2_0(f, header)
        for batch in batches:
            block = batch.column(0).flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
            f.write(block.tobytes())
            row += len(block) // dim
        if row != count:
            raise RuntimeError(f"vector index: expected {count} rows, got {row}")
    return path


PREFETCH_ROWS = 4096  # rows gathered from a memory map with their pages asked for first


class VectorIndex:
    """Unit vectors, one row per searchable image; top-k by cosine (= dot product), exact or,
    for a big library, from the candidates of its approximate index (ann.py) ranked exactly."""

    def __init__(self, matrix: np.ndarray, approximate: ann.Ann | None = None):
        self.matrix = matrix
        self.approximate = approximate
        mapped = getattr(matrix, "_mmap", None)  # a np.memmap's: where its rows lie in the file
        self._mapped = None if mapped is None else (
            mapped, matrix.ctypes.data - np.frombuffer(mapped, dtype=np.uint8).ctypes.data)

    @classmethod
    def open(cls, con: duckdb.DuckDBPyConnection, data_dir: Path, exact: bool = False) -> "VectorIndex":
        return cls.of(catalog.meta(con), data_dir, exact)

    @classmethod
    def of(cls, meta: dict[str, Any], data_dir: Path, exact: bool = False) -> "VectorIndex":
        """The index a catalog's `meta` (clipgram_meta) names."""
        relative = meta.get("vector_index")
        path = data_dir / relative if relative else None
        if path is None or not path.exists():
            raise SearchError(f"no vector index in {data_dir}: run `clipgram ingest` (its publish "
                              f"stage writes one) with a CLIP model")
        matrix = np.load(path, mmap_mode="r")
        approximate = None if exact or not meta.get("ann_index") else ann.load(data_dir / meta["ann_index"], len(matrix))
        return cls(matrix, approximate)

    def top(self, query: np.ndarray, k: int, rows: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
        """(rows, scores) of the `k` best rows, restricted to `rows` when given, best first."""
        query = query.astype(np.float32)
        if self.approximate is not None and (rows is None or len(rows) >= ann.EXACT_BELOW):
            found = self.approximate.candidates(query, max(ann.CANDIDATES, 4 * k), rows)
            if len(found) >= min(k, len(self.matrix) if rows is None else len(rows)):
                return self._exact(query, k, np.sort(found))
        return self._exact(query, k, rows)

    def vectors(self, rows: np.ndarray | list[int]) -> np.ndarray:
        """The float32 vectors of `rows`, in their order."""
        rows = np.asarray(rows, dtype=np.int64)
        if self._mapped is not None and len(rows) <= PREFETCH_ROWS:
            # ask for every row's pages at once: gathered one page fault at a time, rows not in
            # the page cache (a 10M-row matrix is 20 GB) wait for the disk once each: 100 rows
            # took 45-60 ms here, against 1.5 ms asked for together
            mapped, start = self._mapped
            width = self.matrix.shape[1] * self.matrix.itemsize
            for row in rows.tolist():
                first = start + row * width
                page = first - first % mmap.PAGESIZE
                mapped.madvise(mmap.MADV_WILLNEED, page, first + width - page)
        return np.asarray(self.matrix[rows], dtype=np.float32)

    def _exact(self, query: np.ndarray, k: int, rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        # a filter's rows only: scoring every row and then dropping most is the slow way round
        scores = (self.matrix if rows is None else self.vectors(rows)) @ query
        k = min(k, len(scores))
        if k == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        best = np.argpartition(-scores, k - 1)[:k]
        best = best[np.lexsort((best, -scores[best]))]  # by score, ties by row (the order images were published in)
        return (rows[best] if rows is not None else best), scores[best]


class TextIndex:
    """The catalog's BM25 (its bm25() macro) held in memory, for a process that serves many
    queries (the app): every (word, document) share of the score is computed once, so a query
    adds up a few arrays instead of reading the index's tables (10 ms against 70 at 100k)."""

    def __init__(self, media_ids: np.ndarray, words: dict[str, tuple[np.ndarray, np.ndarray]]):
        self.media_ids = media_ids  # document number → media id, in media id order
        self.words = words  # stemmed word → (document numbers, their shares of the score)

    @classmethod
    def build(cls, con: duckdb.DuckDBPyConnection) -> "TextIndex":
        shares = con.execute("SELECT term, media_id, score FROM bm25_terms(NULL) "
                             "ORDER BY term, media_id").fetchnumpy()
        media_ids, docs = np.unique(shares["media_id"].astype(str), return_inverse=True)
        terms = shares["term"].astype(str)
        starts = np.flatnonzero(np.r_[True, terms[1:] != terms[:-1]]) if len(terms) else np.zeros(0, int)
        ends = np.r_[starts[1:], len(terms)]
        scores = shares["score"].astype(np.float64)
        return cls(media_ids, {terms[a]: (docs[a:b], scores[a:b]) for a, b in zip(starts, ends)})

    def _documents_of(self, media_ids: np.ndarray) -> np.ndarray:
        """A mask over the documents: those of `media_ids` (found by bisection: the documents
        are in media id order)."""
        at = np.searchsorted(self.media_ids, media_ids)
        inside = at < len(self.media_ids)
        at = at[inside]
        mask = np.zeros(len(self.media_ids), dtype=bool)
        mask[at[self.media_ids[at] == media_ids[inside]]] = True
        return mask

    def top(self, con: duckdb.DuckDBPyConnection, query: str, k: int,
            media_ids: np.ndarray | None = None) -> list[tuple[str, float]]:
        """(media_id, score) of the best `k` documents matching a word of `query` (among
        `media_ids` when given), best first, ties by media id: what bm25() ranks."""
        words = con.execute("SELECT bm25_words(?)", [query]).fetchone()[0] or []
        found = [self.words[w] for w in words if w in self.words]
        if not found:
            return []
        docs = np.concatenate([d for d, _ in found])
        scores = np.bincount(docs, np.concatenate([s for _, s in found]), len(self.media_ids))
        matched = np.flatnonzero(scores)  # every share of a score is positive
        if media_ids is not None:
            matched = matched[self._documents_of(media_ids)[matched]]
        if len(matched) > k:  # the k best, and every document tied with the k-th
            kth = np.partition(scores[matched], len(matched) - k)[len(matched) - k]
            matched = matched[scores[matched] >= kth]
        best = matched[np.lexsort((matched, -scores[matched]))][:k]  # numbers are in media id order
        return [(str(self.media_ids[d]), float(scores[d])) for d in best]


# --- running a search ---------------------------------------------------------------------------

_HIT_COLUMNS = """i.account, i.shortcode, i.media_id,
    coalesce(i.generated_caption, i.post_caption, '') AS caption, i.path, i.permalink"""


def one_of(values: Iterable[str | int]) -> str:
    """`(v1, v2, …)` for `col IN`, as SQL literals: constants the planner probes an index with
    (a list parameter, as in list_contains(?, col), is a scan of every row), which DuckDB's
    client also binds without trying to import pandas once per value, as it does for every
    parameter (10 ms for a statement of 100 parameters here, without pandas installed)."""
    return "(" + ", ".join(str(v) if isinstance(v, (int, np.integer))
                           else "'" + str(v).replace("'", "''") + "'" for v in values) + ")"


def _hits(con: duckdb.DuckDBPyConnection, data_dir: Path, ranked: list[tuple[str, float]]) -> list[Hit]:
    """Hits for (media_id, score) pairs, in the given order."""
    if not ranked:
        return []
    ids = [m for m, _ in ranked]
    rows = {r[2]: r for r in con.execute(
        f"SELECT {_HIT_COLUMNS} FROM images i WHERE i.media_id IN {one_of(ids)}").fetchall()}
    return [Hit(rank, float(score), *rows[m][:4], str(data_dir / rows[m][4]), rows[m][5])
            for rank, (m, score) in enumerate(ranked, start=1)]


def _check_model(con: duckdb.DuckDBPyConnection, encoder: Encoder) -> None:
    stored = catalog.meta(con).get("clip_model")
    if stored != encoder.id:
        raise SearchError(
            f"the catalog's embeddings are from {stored}, not {encoder.id}: "
            f"search with the same model (--clip-model) or run `clipgram ingest` with this one")


def query_vector(con: duckdb.DuckDBPyConnection, index: VectorIndex, terms: list[Term],
                 encoder: Encoder | None) -> np.ndarray:
    """Σ weight · unit vector of each term, normalised."""
    if any(term.kind != "like" for term in terms):
        if encoder is None:
            raise SearchError("this query needs a CLIP model to encode it")
        _check_model(con, encoder)
    total = np.zeros(index.matrix.shape[1], dtype=np.float32)
    for term in terms:
        if term.kind == "like":
            found = con.execute("SELECT row FROM search_rows WHERE media_id = ?", [term.value]).fetchone()
            if found is None:
                raise SearchError(f"no embedded image with media id {term.value!r}: "
                                  f"see `clipgram sql \"SELECT media_id FROM images\"`")
            vector = np.asarray(index.matrix[found[0]], dtype=np.float32)
        elif term.kind == "text":
            vector = encoder.encode_text([term.value])[0]
        else:
            pixels = encoder.preprocess(images.load_rgb(Path(term.value))).unsqueeze(0)
            vector = encoder.encode_images(pixels)[0]
        total += term.weight * vector
    norm = float(np.linalg.norm(total))
    if norm == 0:
        raise SearchError("the query's terms cancel out: nothing to search for")
    return total / norm


def _candidate_rows(con: duckdb.DuckDBPyConnection, filters: Filters) -> np.ndarray | None:
    if not filters:
        return None
    sql, params = filters.media_sql()
    found = con.execute(f"SELECT row FROM search_rows WHERE media_id IN ({sql}) ORDER BY row",
                        params).fetchnumpy()["row"]
    return np.asarray(found, dtype=np.int64)


def vector_ranking(con: duckdb.DuckDBPyConnection, index: VectorIndex, vector: np.ndarray, k: int,
                   filters: Filters, exclude: set[str] = frozenset()) -> list[tuple[str, float, int]]:
    """(media_id, cosine, row) of the best `k` images that pass `filters`, best first."""
    rows, scores = index.top(vector, k + len(exclude), _candidate_rows(con, filters))
    if not len(rows):
        return []
    ids = dict(con.execute(f"SELECT row, media_id FROM search_rows WHERE row IN {one_of(rows.tolist())}"
                           ).fetchall())
    found = [(ids[r], float(s), r) for r, s in zip(rows.tolist(), scores) if ids[r] not in exclude][:k]
    return sorted(found, key=lambda hit: (-hit[1], hit[0]))  # ties by media id, whatever the rows


def caption_ranking(con: duckdb.DuckDBPyConnection, query: str, k: int, filters: Filters,
                    text: TextIndex | None = None) -> list[tuple[str, float]]:
    """(media_id, BM25 score) over generated captions, post captions, hashtags and alt text;
    from `text` when given (the same ranking, held in memory), else from the catalog."""
    sql, params = filters.media_sql()
    if text is not None:
        passing = con.execute(sql, params).fetchnumpy()["media_id"].astype(str) if filters else None
        return text.top(con, query, k, passing)
    return [(m, float(s)) for m, s in con.execute(f"""
        SELECT media_id, score FROM bm25(?) WHERE media_id IN ({sql})
        ORDER BY score DESC, media_id LIMIT ?""", [query, *params, k]).fetchall()]


def fuse(rankings: list[list[tuple]], k: int) -> list[tuple[str, float]]:
    """Reciprocal rank fusion of rankings of (media_id, score, …): Σ 1 / (RRF_K + rank) per
    media id; ties by media id."""
    fused: dict[str, float] = {}
    for ranking in rankings:
        for rank, (media_id, *_) in enumerate(ranking, start=1):
            fused[media_id] = fused.get(media_id, 0.0) + 1.0 / (RRF_K + rank)
    return sorted(fused.items(), key=lambda item: (-item[1], item[0]))[:k]


def has_captions(con: duckdb.DuckDBPyConnection) -> bool:
    return con.execute("SELECT count(*) FROM documents WHERE length(generated_caption) > 0 "
                       "OR length(post_caption) > 0 OR length(hashtags) > 0").fetchone()[0] > 0


MODES = ("auto", "clip", "captions", "hybrid")


def search(con: duckdb.DuckDBPyConnection, data_dir: Path, terms: list[Term], k: int = 10,
           mode: str = "auto", filters: Filters | None = None,
           encoder: Encoder | None = None, text: TextIndex | None = None, exact: bool = False
           ) -> tuple[str, list[Hit]]:
    """Run a search; returns the mode it ran in (auto resolved) and the hits, best first.

    auto = hybrid for a query of positive text terms when captions exist, else CLIP. `text`:
    the catalog's BM25 held in memory, for a process that keeps it (else read per query).
    `exact`: scan every vector even where the library has an approximate index (ann.py).
    """
    filters = filters or Filters()
    text_only = all(t.kind == "text" and t.weight > 0 for t in terms)
    if mode == "auto":
        mode = "hybrid" if text_only and has_captions(con) else "clip"
    if mode in ("captions", "hybrid") and not text_only:
        raise SearchError(f"--mode {mode} needs text only (no images, --like or negative terms)")
    words = " ".join(t.value for t in terms)
    if mode == "captions":
        return mode, _hits(con, data_dir, caption_ranking(con, words, k, filters, text))
    index = VectorIndex.open(con, data_dir, exact)
    vector = query_vector(con, index, terms, encoder)
    exclude = {t.value for t in terms if t.kind == "like"}  # an image is trivially like itself
    by_vector = vector_ranking(con, index, vector, k if mode == "clip" else max(RRF_POOL, k), filters, exclude)
    ranked = by_vector if mode == "clip" else fuse(
        [by_vector, caption_ranking(con, words, max(RRF_POOL, k), filters, text)], k)
    hits = _hits(con, data_dir, [(m, score) for m, score, *_ in ranked])
    model = encoder.id if encoder is not None else ""  # checked against the catalog's by query_vector
    return mode, judged(con, data_dir, index, terms, vector, hits, model, {m: r for m, _, r in by_vector})


def matches(hits: list[Hit]) -> int | None:
    """How many leading hits match the query; None when they were not judged."""
    return None if not hits or hits[0].match is None else sum(bool(h.match) for h in hits)


def judged(con: duckdb.DuckDBPyConnection, data_dir: Path, index: VectorIndex, terms: list[Term],
           vector: np.ndarray, hits: list[Hit], model: str, rows: dict[str, int]) -> list[Hit]:
    """For a query of text, each hit's `match` (analysis/relevance.py), the matches first in
    their order, then the closest that do not match; other queries (an image, --like), or a
    library with no relevance fit yet (no captions), are returned as they are. `rows`: the
    vector index rows of the hits the vector ranking found (the others are looked up)."""
    from clipgram.analysis import relevance  # imports this module

    if not hits or any(t.kind != "text" for t in terms):
        return hits
    cutoff = relevance.load(data_dir, model)
    if cutoff is None:
        return hits
    missing = [h.media_id for h in hits if h.media_id not in rows]
    if missing:  # found by the caption ranking alone (hybrid)
        rows = {**rows, **dict(con.execute(f"SELECT media_id, row FROM search_rows WHERE media_id IN "
                                           f"{one_of(missing)}").fetchall())}
    vectors = index.vectors([rows[h.media_id] for h in hits])
    query_words = sum(len(relevance.words(t.value)) for t in terms if t.weight > 0)
    legible = _words_in_picture(con, hits, terms)
    for hit, match in zip(hits, cutoff.judge(query_words, vectors, vectors @ vector)):
        hit.match = bool(match) or hit.media_id in legible
    ordered = sorted(hits, key=lambda h: not h.match)  # stable: each group keeps its order
    for rank, hit in enumerate(ordered, start=1):
        hit.rank = rank
    return ordered


_TEXT_WORD = re.compile(r"[^\W_]+")


def _words_in_picture(con: duckdb.DuckDBPyConnection, hits: list[Hit], terms: list[Term]) -> set[str]:
    """The hits whose pictures hold every word of the query, as OCR read them (a poster's
    "Harbour Hall"): they match whatever CLIP makes of the pixels."""
    wanted = {w for t in terms if t.weight > 0 for w in _TEXT_WORD.findall(t.value.casefold())}
    if not wanted:
        return set()
    # the catalog's `documents` table: the words publish stored once, run-together words split
    # (ocr.search_words), not the `images` view's Parquet joins nor wordninja at every search
    found = con.execute(f"SELECT media_id, ocr_text FROM documents WHERE ocr_text <> '' AND media_id IN "
                        f"{one_of([h.media_id for h in hits])}").fetchall()
    return {media_id for media_id, words in found if wanted <= set(_TEXT_WORD.findall(words.casefold()))}


def text_search(con: duckdb.DuckDBPyConnection, data_dir: Path, encoder: clip.ClipEncoder,
                query: str, k: int = 10, filters: Filters | None = None) -> list[Hit]:
    """Images ranked by cosine similarity of their CLIP embedding to `query`'s."""
    return search(con, data_dir, [Term("text", query)], k, "clip", filters, encoder)[1]


def caption_search(con: duckdb.DuckDBPyConnection, data_dir: Path, query: str, k: int = 10,
                   filters: Filters | None = None) -> list[Hit]:
    """BM25 over generated captions, post captions, hashtags, alt text and the text in images."""
    return search(con, data_dir, [Term("text", query)], k, "captions", filters)[1]
