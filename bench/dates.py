"""`python -m bench.dates`: clipgram's date reading (`clipgram.query`) against dateparser's.

Opt-in: it needs `pip install dateparser`, which clipgram does not depend on; this is the
measurement that ruled it out. Both read the dates of the query-understanding test cases
(tests/test_query.py: queries as people type them into photo search, a quarter of which must
stay text) with the same "today". dateparser is given what a caller would pin: English only,
relative dates from that today, dates from the past; its `search_dates` finds points in time,
each taken as the span of the granularity it reports (a year, a month, a day), and several as
the span from the first to the last. Reported per reader: cases whose since/until come out as
the test expects, dates read from a query that must stay text, and median ms per query.
Results merge into bench/results.json under "dates".
"""

from __future__ import annotations

import argparse
import calendar
import importlib.util
import statistics
import time
from datetime import date, datetime
from pathlib import Path
from typing import Any, Callable

from bench import save_section

CASES_FILE = Path(__file__).resolve().parent.parent / "tests" / "test_query.py"
Span = tuple[date | None, date | None]


def cases() -> tuple[list[tuple], date]:
    spec = importlib.util.spec_from_file_location("clipgram_query_cases", CASES_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CASES, module.TODAY


def clipgram_reader(today: date) -> Callable[[str], Span]:
    from clipgram import query

    def read(text: str) -> Span:
        parsed = query.parse(text, today)
        return parsed.since, parsed.until
    return read


def _span(found: datetime, period: str) -> Span:
    day = found.date()
    if period == "year":
        return date(day.year, 1, 1), date(day.year, 12, 31)
    if period == "month":
        return day.replace(day=1), day.replace(day=calendar.monthrange(day.year, day.month)[1])
    return day, day


def dateparser_reader(today: date) -> Callable[[str], Span]:
    from dateparser import DateDataParser
    from dateparser.search import search_dates

    settings = {"RELATIVE_BASE": datetime.combine(today, datetime.min.time()),
                "PREFER_DATES_FROM": "past", "RETURN_TIME_AS_PERIOD": True}
    periods = DateDataParser(languages=["en"], settings=settings)

    def read(text: str) -> Span:
        found = search_dates(text, languages=["en"], settings=settings) or []
        spans = []
        for words, when in found:
            data = periods.get_date_data(words)
            spans.append(_span(when, data.period or "day"))
        if not spans:
            return None, None
        return min(s for s, _ in spans), max(u for _, u in spans)
    return read


def measure(read: Callable[[str], Span], all_cases: list[tuple], repeats: int = 5) -> dict[str, Any]:
    right = dated_text = 0
    times = []
    for case in all_cases:
        text, since, until = case[0], case[2], case[3]
        for _ in range(repeats):
            started = time.perf_counter()
            got = read(text)
            times.append(time.perf_counter() - started)
        expected = (since and date.fromisoformat(since), until and date.fromisoformat(until))
        right += got == expected
        dated_text += case[1] == case[0] and got != (None, None)
    must_stay = sum(c[1] == c[0] for c in all_cases)
    # "since March 2024", "before 2020": a span open at one end, which points in time cannot say
    open_ended = sum((c[2] is None) != (c[3] is None) for c in all_cases)
    return {"cases": len(all_cases), "dates_right": right, "open_ended": open_ended, "must_stay_text": must_stay,
            "dates_read_from_text": dated_text, "median_ms": round(statistics.median(times) * 1000, 3)}


def run() -> dict[str, Any]:
    all_cases, today = cases()
    return {"clipgram": measure(clipgram_reader(today), all_cases),
            "dateparser": measure(dateparser_reader(today), all_cases)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results.json"))
    args = parser.parse_args(argv)
    save_section(args.out, "dates", run())


if __name__ == "__main__":
    main()
