"""`clipgram`: ingest accounts, search images, run SQL, see where every stage stands."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import sys
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import duckdb

from clipgram import catalog, dag, query, report, search, status, storage
from clipgram.config import CONFIG_DIR, Config, ConfigError, defaults, load_config
from clipgram.errors import ClipgramError, disk_full, says_disk_full
from clipgram.result import StageResult
from clipgram.stages import publish

if TYPE_CHECKING:
    from clipgram.models.clip import ClipEncoder

log = logging.getLogger("clipgram")

# flag → (section, key): the common settings, overridable on the command line
FLAGS = {
    "data_dir": ("data", "dir"),
    "device": ("models", "device"),
    "clip_model": ("models", "clip"),
    "captioner": ("models", "captioner"),
    "batch_size": ("embed", "batch_size"),
    "concurrency": ("download", "concurrency"),
    "limit": ("scrape", "limit"),
    "since": ("scrape", "since"),
    "full": ("scrape", "full"),
    "session": ("scrape", "session_user"),
    "session_dir": ("scrape", "session_dir"),
    "videos": ("download", "videos"),
    "allow_private_network": ("download", "allow_private_network"),
}


def _config(args: argparse.Namespace, default_file: Path | None = None) -> Config:
    overrides: dict[str, dict[str, Any]] = {}
    for flag, (section, key) in FLAGS.items():
        if getattr(args, flag, None) is not None:
            overrides.setdefault(section, {})[key] = getattr(args, flag)
    cfg = load_config(args.config or default_file, overrides)
    if not storage.is_url(cfg.data.dir):
        cfg = cfg.replace("data", dir=str(cfg.data_dir))  # absolute from here on: tasks may run elsewhere
    storage.pull(cfg.data_dir)  # an object-store data dir: what other machines wrote, first
    return cfg


def _catalog(cfg: Config) -> duckdb.DuckDBPyConnection:
    """The catalog, read-only. A mirror of an object-store data dir may hold parts its
    catalog lacks (another machine ingested): those are published first; so is a catalog
    that another version of clipgram built."""
    if storage.remote_url(cfg.data_dir):
        publish.republish(cfg.data_dir)
    else:
        publish.upgrade(cfg.data_dir)
    return catalog.connect(cfg.data_dir)


def _encoder(cfg: Config) -> ClipEncoder:
    from clipgram.models import clip  # torch and open_clip: only for commands that encode

    return clip.from_config(cfg.models)


def _query_encoder(cfg: Config, con: duckdb.DuckDBPyConnection) -> Any:
    """What encodes a query of text alone. With `clip = "auto"` that is the model the
    catalog's embeddings are from, from its saved text tower when there is one (no open_clip
    import: 2–3 s less); otherwise, or for a model named, the whole model."""
    from clipgram.models import model_cache_dir, query_encoder  # torch only

    stored = catalog.meta(con).get("clip_model")
    if cfg.models.clip == "auto" and stored:
        saved = query_encoder.load(model_cache_dir(cfg.models.cache_dir), stored)
        if saved is not None:
            return saved
    return _encoder(cfg)


def _format(args: argparse.Namespace) -> str:
    return "json" if getattr(args, "json", False) else "csv" if getattr(args, "csv", False) else "table"


def run_ingest(cfg: Config, account: str, recorded: Path | None, source: Path | None = None,
               stages_to_run: list[str] | None = None,
               retry_failed: bool = False) -> list[StageResult]:
    from clipgram.flows.ingest import ingest_account  # Prefect is slow to import: only when needed

    return ingest_account(account, cfg.as_dict(), str(recorded) if recorded else None,
                          str(source) if source else None, stages_to_run=stages_to_run,
                          retry_failed=retry_failed)


def _print_results(cfg: Config, results: list[StageResult]) -> None:
    report.print_rows(["stage", "done", "failed", "note"],
                      [[r.stage, r.done, r.failed, r.note] for r in results])
    meta = catalog.meta(catalog.connect(cfg.data_dir))
    ocr = f", OCR {meta['ocr']}" if meta.get("ocr") else ""
    print(f"models: CLIP {meta['clip_model']}, captioner {meta['captioner']}{ocr}")


def cmd_ingest(args: argparse.Namespace) -> int:
    from clipgram import tables
    from clipgram.stages import scrape

    cfg = _config(args)
    scrape.parse_since(cfg.scrape.since)  # a bad date fails before any work starts
    target = Path(args.account).expanduser()
    if args.recorded is None and target.exists():  # a folder of images or a URL list
        account = scrape.account_for(target, args.as_name)
        try:
            tables.check_partition_value(account)
        except ValueError as e:
            raise ConfigError(f"{e}; name the account with --as NAME") from None
        log.info("ingesting %s %s as account %s", "folder" if target.is_dir() else "URL list",
                 target, account)
        _print_results(cfg, run_ingest(cfg, account, None, target.resolve(), retry_failed=args.retry_failed))
        return 0
    if args.as_name:
        raise ConfigError(f"--as names a folder or URL list, and {args.account} is neither "
                          "(for an Instagram profile the account is its username)")
    _print_results(cfg, run_ingest(cfg, args.account, args.recorded, retry_failed=args.retry_failed))
    return 0


def cmd_login(args: argparse.Namespace) -> int:
    from clipgram.sources import session

    cfg = _config(args)
    path = session.login(args.user, cfg.scrape.session_dir)
    print(f"session saved to {path}; ingest with --session {args.user} "
          f"(or set scrape.session_user = \"{args.user}\")")
    return 0




def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date as YYYY-MM-DD, got {text!r}") from None


def _filters(args: argparse.Namespace) -> search.Filters:
    return search.Filters(
        accounts=args.account or [], since=args.posted_since, until=args.posted_until,
        hashtags=args.hashtag or [], min_likes=args.min_likes, labels=[search.parse_label_filter(t) for t in args.label or []],
        has_text=args.has_text, where=args.where)


def cmd_search(args: argparse.Namespace) -> int:
    cfg = _config(args)
    filters, terms = _filters(args), []
    if args.query:
        parsed, filters = query.read(args.query, filters, date.today(), args.literal)
        log.info("%s", parsed.says())
        terms = search.parse_query(parsed.text)
    terms += [search.Term("image", str(p)) for p in args.image or []]
    terms += [search.Term("like", m) for m in args.like or []]
    if not terms:
        raise search.SearchError("nothing to search for: give a query, --image FILE or --like MEDIA_ID")
    mode = "captions" if args.captions else args.mode
    con = _catalog(cfg)  # read-only: a search never writes
    needs_model = mode != "captions" and any(t.kind != "like" for t in terms)
    encoder = None if not needs_model else (
        _encoder(cfg) if any(t.kind == "image" for t in terms) else _query_encoder(cfg, con))
    mode, hits = search.search(con, cfg.data_dir, terms, args.k or cfg.search.k, mode, filters, encoder,
                               exact=args.exact)
    matched = search.matches(hits)
    log.info("%s search: %d hits%s", mode, len(hits), "" if matched is None else
             f", {matched} matching" if matched else ", none matching: the closest are shown")
    report.print_hits(hits, _format(args))
    if args.html:
        title = " + ".join(f"{t.weight:g}·{t.value}" if t.weight != 1 else t.value for t in terms)
        report.write_html(args.html, [(f"{title} ({mode})", hits)])
        log.info("results page written to %s", args.html)
    return 0


def _run_sql(con: duckdb.DuckDBPyConnection, query: str, fmt: str) -> None:
    relation = con.sql(query)
    if relation is None:  # a statement with no result set
        return
    report.print_rows(relation.columns, relation.fetchall(), fmt)


def cmd_sql(args: argparse.Namespace) -> int:
    cfg = _config(args)
    con = _catalog(cfg)
    stored = catalog.meta(con)
    if stored.get("clip_model") and stored.get("clip_dim"):
        catalog.register_udfs(con, stored["clip_model"], int(stored["clip_dim"]),
                              lambda: _encoder(cfg), search.VectorIndex.open(con, cfg.data_dir))
    if args.query:
        _run_sql(con, args.query, _format(args))
        return 0
    print("clipgram sql — end statements with ';', quit with Ctrl-D", file=sys.stderr)
    buffer = ""
    while True:
        try:
            line = input("clipgram> " if not buffer else "     ...> ")
        except EOFError:
            return 0
        buffer += line + "\n"
        if buffer.strip().endswith(";"):
            try:
                _run_sql(con, buffer, _format(args))
            except duckdb.Error as e:
                print(f"error: {e}", file=sys.stderr)
            buffer = ""


def _stored_model(cfg: Config) -> str:
    """The CLIP model id the catalog's embeddings are from: analysis reads those, never re-encodes."""
    with _catalog(cfg) as con:
        model = catalog.meta(con).get("clip_model")
    if not model:
        raise search.SearchError("the catalog has no embeddings: run `clipgram ingest` with a CLIP model")
    return model


def cmd_labels(args: argparse.Namespace) -> int:
    from clipgram.analysis import labels

    cfg = _config(args)
    if args.action == "define":
        pairs = [search.parse_label_filter(p) for p in args.labels]
        path = labels.define(cfg.data_dir, args.name, {k: v.split("|") for k, v in pairs}, args.template)
        log.info("label set %s written to %s; score it with `clipgram labels run --set %s`",
                 args.name, path, args.name)
        return 0
    if args.action == "list":
        rows = [[s.name, label, " | ".join(s.prompts(label))]
                for s in labels.load_sets(cfg.data_dir).values() for label in s.labels]
        report.print_rows(["label_set", "label", "prompts"], rows, _format(args))
        return 0
    encoder, stored = _encoder(cfg), _stored_model(cfg)
    if encoder.id != stored:
        raise search.SearchError(f"the catalog's embeddings are from {stored}, not "
                                 f"{encoder.id}: pass the same --clip-model")
    results = labels.run(cfg.data_dir, encoder, args.set)
    publish.republish(cfg.data_dir)
    report.print_rows(["label_set", "images", "note"], [[r.account, r.done, r.note] for r in results])
    return 0


def _publish_and_show(cfg: Config, args: argparse.Namespace, sql: str) -> None:
    """Publish the derived table just written, then print `sql`'s rows for the command's scope."""
    from clipgram.analysis import derived

    publish.republish(cfg.data_dir)
    relation = catalog.connect(cfg.data_dir).execute(sql, [args.account or derived.ALL_ACCOUNTS])
    report.print_rows([d[0] for d in relation.description], relation.fetchall(), _format(args))


def cmd_clusters(args: argparse.Namespace) -> int:
    from clipgram.analysis import clusters

    cfg = _config(args)
    if args.rename:
        cluster, name = args.rename
        clusters.rename(cfg.data_dir, _stored_model(cfg), args.account, int(cluster), name).log()
    else:
        k = None if args.k == "auto" else int(args.k)
        clusters.run(cfg.data_dir, _stored_model(cfg), args.account, k, cfg.analysis.k_max).log()
    _publish_and_show(cfg, args, """
        SELECT cluster, cluster_name, count(*) AS images, round(avg(similarity), 3) AS cohesion,
               any_value(silhouette) AS silhouette
        FROM clusters WHERE scope = ? GROUP BY ALL ORDER BY images DESC, cluster""")
    return 0


def cmd_map(args: argparse.Namespace) -> int:
    from clipgram.analysis import projection

    cfg = _config(args)
    png = args.out or cfg.data_dir / "map.png"
    page = args.html or png.with_suffix(".html")
    result = projection.run(cfg.data_dir, _stored_model(cfg), args.account, png, page,
                            args.method or cfg.analysis.map_method)
    print(f"map ({result.note})")
    return 0


def cmd_duplicates(args: argparse.Namespace) -> int:
    from clipgram.analysis import duplicates

    cfg = _config(args)
    threshold = args.threshold if args.threshold is not None else cfg.analysis.duplicate_threshold
    duplicates.run(cfg.data_dir, _stored_model(cfg), args.account, threshold).log()
    _publish_and_show(cfg, args, """
        SELECT group_id, kind, media_id, account, round(similarity, 4) AS similarity, sha256
        FROM duplicates WHERE scope = ? ORDER BY group_id, similarity DESC, media_id""")
    return 0


def cmd_analyse(args: argparse.Namespace) -> int:
    from clipgram.stages import analyse

    cfg = _config(args)
    _catalog(cfg)  # no library yet: say so
    analyse.analyse(cfg, args.account, refit=args.refit)
    return 0


def _status(cfg: Config) -> list[dict]:
    meta = catalog.meta(catalog.connect(cfg.data_dir)) if (cfg.data_dir / catalog.CATALOG).exists() else {}
    return status.rows(cfg.data_dir, meta.get("clip_model"), meta.get("captioner"), meta.get("ocr"))


def cmd_app(args: argparse.Namespace) -> int:
    from clipgram.app import library, server, sql

    cfg = _config(args)
    catalog.connect(cfg.data_dir)  # no library yet: say so now, not at the first request
    token = args.token or (None if server.is_loopback(args.host) else server.new_token())
    where = f"http://{args.host}:{args.port}/" + (f"?token={token}" if token else "")
    print(f"clipgram app on {cfg.data_dir}: open {where}  (Ctrl-C stops it)", flush=True)
    limits = sql.Limits(args.sql_rows, args.sql_timeout) if args.allow_sql else None
    server.serve(library.Library(cfg.data_dir, cfg.models, limits), args.host, args.port, token)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    rows = _status(_config(args))
    columns = list(status.COLUMNS)
    report.print_rows(columns, [[r[c] for c in columns] for r in rows], _format(args))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """List the unreadable files of the tables (doctor); with repair, move them to quarantine/."""
    from clipgram import doctor

    cfg = _config(args)
    problems = doctor.check(cfg.data_dir)
    if not problems:
        log.info("every file under %s reads", cfg.data_dir / "tables")
        return 0
    if not args.repair:
        report.print_rows(["file", "problem"], [[str(p.path), p.what] for p in problems], _format(args))
        log.warning("%d unreadable file(s): `%s` moves them into %s/ (nothing is deleted)", len(problems),
                    next_steps(cfg.data_dir, [["repair"]])[0], doctor.QUARANTINE)
        return 1
    moved = doctor.repair(cfg.data_dir, problems)
    report.print_rows(["file", "problem", "moved to"],
                      [[str(p.path), p.what, str(m.relative_to(cfg.data_dir))] for p, m in zip(problems, moved)],
                      _format(args))
    accounts = sorted({part.split("=", 1)[1] for p in problems for part in p.path.parts
                       if part.startswith("account=")}) or ["ACCOUNT"]
    log.info("moved %d file(s) into %s/; to redo the rows they held: %s", len(moved), doctor.QUARANTINE,
             "; ".join(next_steps(cfg.data_dir, [["rerun", "--account", a] for a in accounts])))
    if (cfg.data_dir / catalog.CATALOG).exists():  # its views and snapshot tables: over what is left
        publish.republish(cfg.data_dir, force=True)
    return 0


def cmd_rerun(args: argparse.Namespace) -> int:
    from clipgram import rerun

    cfg = _config(args)
    rows = _status(cfg)
    if args.stage is None and not any(r["account"] == args.account for r in rows):
        print(f"error: no runs of {args.account} in {cfg.data_dir}: "
              f"start with `clipgram ingest {args.account}`", file=sys.stderr)
        return 2
    todo = rerun.plan(rows, args.account, args.stage, args.only, args.retry_failed)
    if not todo:
        print(f"nothing to rerun: every stage of {args.account} is done "
              "(--retry-failed retries failed items, --stage S reruns a stage anyway)")
        return 0
    log.info("rerunning %s for %s", " → ".join(todo), args.account)
    _print_results(cfg, run_ingest(cfg, args.account, args.recorded, stages_to_run=todo,
                                   retry_failed=args.retry_failed))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from clipgram import schedule
    from clipgram.flows import deploy  # Prefect is slow to import: only when needed

    cfg = _config(args)
    accounts = schedule.load_accounts(args.accounts)
    deploy.serve(deploy.deployments(accounts, cfg), limit=args.limit)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from clipgram import demo

    cfg = _config(args, default_file=CONFIG_DIR / "demo.toml")
    with demo.serve(demo.SAMPLE_DIR) as base_url:
        log.info("serving the sample profile on %s", base_url)
        recorded = demo.materialize(cfg.data_dir / "recorded" / demo.ACCOUNT, base_url)
        _print_results(cfg, run_ingest(cfg, demo.ACCOUNT, recorded))
    sections = []
    con, encoder = catalog.connect(cfg.data_dir), _encoder(cfg)
    for title, text, mode in [("Text → image (CLIP): 'a blue circle'", "a blue circle", "clip"),
                               ("Hybrid, CLIP + BM25 fused (search's default): 'a blue circle'",
                                "a blue circle", "hybrid"),
                               ("Caption full-text (BM25): 'yellow square'", "yellow square", "captions"),
                               # words only a poster's picture holds: the ocr stage read them
                               ("Text in images (OCR, BM25): 'harbour hall'", "harbour hall", "captions")]:
        print(f"\n== {title}")
        _, hits = search.search(con, cfg.data_dir, [search.Term("text", text)], 5, mode,
                                encoder=encoder)
        report.print_hits(hits)
        sections.append((title, hits))
    print("\n== SQL: the account's top hashtags")
    sql = ("SELECT tag, count(*) AS posts, sum(likes) AS likes FROM "
           "(SELECT unnest(hashtags) AS tag, likes FROM posts) GROUP BY tag ORDER BY posts DESC, tag LIMIT 5")
    print(sql)
    _run_sql(catalog.connect(cfg.data_dir), sql, "table")
    page = report.write_html(cfg.data_dir / "demo.html", sections)
    print(f"\nResults page: {page}")
    print(f"\nNext, on this library ({cfg.data_dir}):")
    for line in next_steps(cfg.data_dir):
        print(f"  {line}")
    print(f"\nSearch and explore it in a browser:\n  {next_steps(cfg.data_dir, APP_STEP)[0]}")
    return 0


# What the demo suggests next: each is run by tests/test_demo.py as printed
NEXT_STEPS = (
    ["search", "a red square"],
    ["search", "a red square", "--mode", "clip", "--html", "results.html"],
    ["search", "triangle", "--captions"],
    ["sql", "SELECT caption, count(*) AS images FROM captions GROUP BY ALL ORDER BY images DESC LIMIT 5"],
    ["status"],
    ["sql", "SELECT cluster_name, count(*) AS images FROM clusters GROUP BY ALL ORDER BY images DESC"],
)
APP_STEP = (["app"],)  # serves until stopped: printed apart, and tested by starting it


def next_steps(data_dir: Path, steps: Sequence[Sequence[str]] = NEXT_STEPS) -> list[str]:
    """The commands to try on the library in `data_dir`, as a user would type them here."""
    program, typed = Path(sys.argv[0]), "clipgram"
    if program.name == "clipgram" and not shutil.which("clipgram"):
        # `make demo` runs .venv/bin/clipgram: suggest that path, relative when it is below here
        relative = os.path.relpath(program)
        typed = str(program.resolve()) if relative.startswith("..") else relative
    where = [] if data_dir.resolve() == defaults().data_dir else ["--data-dir", str(data_dir)]
    return [shlex.join([typed, command, *where, *rest]) for command, *rest in steps]


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, help="TOML file merged over configs/default.toml")
    common.add_argument("--data-dir", help="data directory (default ./data; env CLIPGRAM_DATA_DIR)")
    common.add_argument("--device", help="auto, cuda, mps or cpu")
    common.add_argument("--clip-model", help="NAME:TAG, NAME:/path/ckpt.pt, hf-hub:ORG/REPO, tiny, auto")
    common.add_argument("--captioner", help="CoCa model id, same forms as --clip-model")
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    out = argparse.ArgumentParser(add_help=False)
    out.add_argument("--json", action="store_true", help="machine-readable JSON rows")
    out.add_argument("--csv", action="store_true", help="CSV rows")

    parser = argparse.ArgumentParser(prog="clipgram", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    # what ingest and rerun share: where posts come from and how images are fetched
    fetching = argparse.ArgumentParser(add_help=False)
    fetching.add_argument("--recorded", type=Path,
                          help="read the profile from instaloader JSON files here")
    fetching.add_argument("--videos", action="store_true", default=None,
                          help="also download videos (thumbnails always are)")
    fetching.add_argument("--allow-private-network", action="store_true", default=None,
                          help="allow URLs and redirects into loopback/private networks")
    fetching.add_argument("--concurrency", type=int, help="parallel downloads")
    fetching.add_argument("--batch-size", type=int, help="embedding batch size")
    fetching.add_argument("--retry-failed", action="store_true",
                          help="queue failed downloads again first")

    p = sub.add_parser("ingest", parents=[common, fetching],
                       help="scrape, download, embed, caption, publish")
    p.add_argument("account", help="Instagram username, a folder of images, or a URL list file "
                   "(one URL per line, or JSON)")
    p.add_argument("--as", dest="as_name", metavar="NAME",
                   help="account name for a folder or URL list (default: its name)")
    p.add_argument("--limit", type=int, help="at most N new posts this run")
    p.add_argument("--since", metavar="DATE", help="no posts older than DATE (e.g. 2024-01-31)")
    p.add_argument("--full", action="store_true", default=None,
                   help="walk the whole profile, not only posts newer than the last run's")
    p.add_argument("--session", metavar="USER", help="use USER's session (see `clipgram login`)")
    p.add_argument("--session-dir", help="where session files live (default instaloader's)")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("login", parents=[common],
                       help="log in to Instagram and save an instaloader session file")
    p.add_argument("user", help="your Instagram username (the password is asked, never stored)")
    p.add_argument("--session-dir", help="where to save it (default instaloader's)")
    p.set_defaults(func=cmd_login)

    p = sub.add_parser("search", parents=[common, out], help="search images by text, image or caption",
                       description=search.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("query", nargs="?", help='text, or arithmetic: \'"2:a dog" + photo.jpg - "fruit"\'')
    p.add_argument("-k", type=int, help="number of results (default [search] k)")
    p.add_argument("--image", action="append", type=Path, help="an image file to search by (repeatable)")
    p.add_argument("--like", action="append", metavar="MEDIA_ID", help="images like a stored one")
    p.add_argument("--mode", choices=search.MODES, default="auto",
                   help="auto (hybrid for text when captions exist, else clip), clip, captions, hybrid")
    p.add_argument("--captions", action="store_true", help="same as --mode captions (BM25 only)")
    p.add_argument("--account", action="append", help="only this account (repeatable)")
    # own dests: `--since` of ingest is a setting (scrape.since), this one a filter
    p.add_argument("--since", dest="posted_since", type=_date, help="posted on or after YYYY-MM-DD")
    p.add_argument("--until", dest="posted_until", type=_date, help="posted on or before YYYY-MM-DD")
    p.add_argument("--hashtag", action="append", help="post has this hashtag (repeatable: all of them)")
    p.add_argument("--min-likes", type=int, help="at least N likes")
    p.add_argument("--label", action="append", metavar="SET=LABEL",
                   help="best zero-shot label of SET is LABEL (see `clipgram labels`)")
    text = p.add_mutually_exclusive_group()
    text.add_argument("--with-text", dest="has_text", action="store_const", const=True,
                      help="only images with text in them (read by the ocr stage)")
    text.add_argument("--without-text", dest="has_text", action="store_const", const=False,
                      help="only images without text in them")
    p.add_argument("--where", help="SQL predicate over the images view, e.g. \"likes > 100\"")
    p.add_argument("--literal", action="store_true",
                   help="search the query as typed: read no dates, @accounts, #hashtags or likes from it")
    p.add_argument("--exact", action="store_true",
                   help="scan every vector, even where the library has an approximate index")
    p.add_argument("--html", type=Path, help="also write a results page with thumbnails")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("sql", parents=[common, out], help="run SQL on the catalog (shell if no query)")
    p.add_argument("query", nargs="?")
    p.set_defaults(func=cmd_sql)

    p = sub.add_parser("labels", parents=[common, out], help="zero-shot labels from stored embeddings")
    p.add_argument("action", choices=["run", "define", "list"],
                   help="run: score images against label sets; define: add a set; list: show sets")
    p.add_argument("name", nargs="?", help="define: the label set's name")
    p.add_argument("labels", nargs="*", metavar="LABEL=PROMPT[|PROMPT…]", help="define: its labels")
    p.add_argument("--set", action="append", help="run: only this label set (repeatable)")
    p.add_argument("--template", action="append", help='define: prompt template, "{}" is the prompt')
    p.set_defaults(func=cmd_labels)

    p = sub.add_parser("clusters", parents=[common, out], help="group images by k-means on embeddings")
    p.add_argument("--account", help="only this account (default: across all)")
    p.add_argument("-k", default="auto", help="number of clusters, or auto (best silhouette)")
    p.add_argument("--rename", nargs=2, metavar=("CLUSTER", "NAME"),
                   help="name a cluster yourself: the name stays as images are added and clusters refitted")
    p.set_defaults(func=cmd_clusters)

    p = sub.add_parser("map", parents=[common], help="2-D map of the images: PNG and HTML")
    p.add_argument("--out", type=Path, help="PNG file to write (default: map.png in the data directory)")
    p.add_argument("--html", type=Path, help="interactive page (default: --out with .html)")
    p.add_argument("--account", help="only this account (default: across all)")
    p.add_argument("--method", choices=["auto", "umap", "pca"], help="default [analysis] map_method")
    p.set_defaults(func=cmd_map)

    p = sub.add_parser("duplicates", parents=[common, out], help="exact and near-duplicate images")
    p.add_argument("--account", help="only this account (default: across all)")
    p.add_argument("--threshold", type=float, help="cosine threshold (default [analysis] duplicate_threshold)")
    p.set_defaults(func=cmd_duplicates)

    p = sub.add_parser("analyse", parents=[common],
                       help="bring labels, clusters, map and duplicates up to date (the analyse stage)")
    p.add_argument("--account", help="also this account's own clusters, map and duplicates")
    p.add_argument("--refit", action="store_true",
                   help="fit every analysis anew, instead of placing new images on the stored fits")
    p.set_defaults(func=cmd_analyse)

    p = sub.add_parser("status", parents=[common, out], help="done / pending / failed per stage")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("app", parents=[common], help="serve the search and explore pages (a local web app)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default 127.0.0.1; any other needs a token)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token", help="the token other hosts must send (default: generated and printed)")
    p.add_argument("--allow-sql", action="store_true",
                   help="serve POST /api/sql: one read-only SELECT at a time, no file access "
                        "outside the library, rows and run time capped")
    p.add_argument("--sql-rows", type=int, default=1000, metavar="N", help="--allow-sql: rows returned at most")
    p.add_argument("--sql-timeout", type=float, default=10.0, metavar="S",
                   help="--allow-sql: seconds a statement may run")
    p.set_defaults(func=cmd_app)

    p = sub.add_parser("doctor", parents=[common, out], help="list the files of the tables that do not read")
    p.set_defaults(func=cmd_doctor, repair=False)
    p = sub.add_parser("repair", parents=[common, out],
                       help="move the files that do not read into quarantine/, for a rerun to redo their rows")
    p.set_defaults(func=cmd_doctor, repair=True)

    p = sub.add_parser("rerun", parents=[common, fetching],
                       help="rerun failed or pending stages of an account")
    p.add_argument("--account", required=True)
    p.add_argument("--stage", choices=dag.NAMES,
                   help="first stage to rerun (default: the first with pending or failed work)")
    p.add_argument("--only", action="store_true", help="just that stage, not the ones after it")
    p.set_defaults(func=cmd_rerun)

    p = sub.add_parser("serve", parents=[common],
                       help="run every account of accounts.toml on its schedule (Prefect deployments)")
    p.add_argument("--accounts", type=Path, default=CONFIG_DIR / "accounts.toml",
                   help="accounts file (default configs/accounts.toml)")
    p.add_argument("--limit", type=int, help="at most N flow runs at once")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", parents=[common], help="ingest and search the embedded sample profile")
    p.set_defaults(func=cmd_demo)
    return parser


def _not_reported_here(record: logging.LogRecord) -> bool:
    """Prefect logs a failed run's exception with its traceback, and its state; ours (which say
    what to do) and a full disk `main` says in one line."""
    error = record.exc_info[1] if record.exc_info else None
    return not (isinstance(error, ClipgramError) or disk_full(error) or says_disk_full(record.getMessage()))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # clipgram's own story at INFO (-v: DEBUG); other libraries only warn (-v: their INFO too)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("clipgram").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if not args.verbose and args.func is not cmd_serve:
        # Prefect's lines on each task and its temporary server: our stage lines say it all.
        # `serve` keeps them (they are its story), and so do the UI's run logs: not the console's
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        for name in ("prefect.flow_runs", "prefect.task_runs"):  # the failure is ours to report
            logging.getLogger(name).addFilter(_not_reported_here)
        for name in ("EventsWorker", "APILogWorker"):  # Prefect's queues draining as a quick run exits
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        return args.func(args)
    # ours say what to do; duckdb.Error is the user's own SQL or a table file that does not
    # read (then doctor says what to do), FileNotFoundError a path they named; a full disk,
    # whichever library met it, is one line too
    except Exception as e:
        if disk_full(e):
            where = getattr(e, "filename", None) or getattr(args, "data_dir", None) or "the data directory"
            print(f"error: the disk holding {where} is full: free some space and run the same command "
                  "again; what was finished is kept, and the rerun does the rest", file=sys.stderr)
            return 2
        from clipgram import doctor

        said = doctor.unreadable(e) or e  # a table file that does not read: which, and what to do
        if not isinstance(said, (ClipgramError, duckdb.Error, FileNotFoundError)):
            raise
        print(f"error: {said}", file=sys.stderr)
        return 2

if __name__ == "__main__":
    sys.exit(main())
