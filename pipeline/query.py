"""What a search's text asks for besides what it shows: dates, accounts, hashtags, likes.

`parse("beach in July 2023 by @nasa", today)` reads the filters people write into a photo search
and leaves the rest to be searched: `Parsed(text="beach", since=2023-07-01, until=2023-07-31,
accounts=("nasa",))`. A deterministic grammar, no model: a phrase becomes a filter only when it
cannot mean anything else, so a month or season needs a year or "last"/"this" ("summer dress",
"may flowers" stay text), a bare number is a year only between 1900 and next year, and an
impossible range (its end before its start) is left as text.
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass, field, replace
from datetime import date, timedelta

from clipgram import search

MONTHS = {name: i for i, name in enumerate(calendar.month_name) if name} | {
    name: i for i, name in enumerate(calendar.month_abbr) if name}
MONTHS = {name.lower(): i for name, i in MONTHS.items()} | {"sept": 9}
SEASONS = {"spring": (3, 5), "summer": (6, 8), "autumn": (9, 11), "fall": (9, 11), "winter": (12, 2)}

_MONTH = "(?:" + "|".join(sorted(MONTHS, key=len, reverse=True)) + r")\.?"
_SEASON = "(?:" + "|".join(SEASONS) + ")"
_YEAR = r"(?:19\d\d|2\d\d\d)"
# a period: "July 2023", "summer 2022", "2023", "last year", "this month", "last summer"
_PERIOD = (rf"(?:(?:{_MONTH}|{_SEASON})\s+(?:of\s+)?{_YEAR}|{_YEAR}|(?:last|this)\s+(?:year|month|week|"
           rf"{_SEASON}|{_MONTH}))")
_WHAT = r"(?:(?:taken|posted|shot|photos?|pictures?|images?)\s+)?"
_LEAD = _WHAT + r"(?:in|from|during|of|on)\s+"


@dataclass(frozen=True)
class Parsed:
    text: str                           # what is searched
    since: date | None = None
    until: date | None = None           # inclusive
    accounts: tuple[str, ...] = ()
    hashtags: tuple[str, ...] = ()
    min_likes: int | None = None
    read: tuple[str, ...] = field(default=(), compare=False)  # the phrases taken as filters

    def as_dict(self) -> dict:
        return {"text": self.text, "since": self.since.isoformat() if self.since else None,
                "until": self.until.isoformat() if self.until else None,
                "accounts": list(self.accounts), "hashtags": list(self.hashtags), "min_likes": self.min_likes}

    def says(self) -> str:
        """One line: what the search reads its query as."""
        parts = [f"searching {self.text!r}" if self.text else "searching everything"]
        if self.since and self.until:
            parts.append(f"in posts from {self.since} to {self.until}")
        elif self.since:
            parts.append(f"in posts from {self.since} on")
        elif self.until:
            parts.append(f"in posts up to {self.until}")
        if self.accounts:
            parts.append("by " + ", ".join(f"@{a}" for a in self.accounts))
        if self.hashtags:
            parts.append("tagged " + " ".join(f"#{t}" for t in self.hashtags))
        if self.min_likes is not None:
            parts.append(f"with at least {self.min_likes} likes")
        return " ".join(parts)


def _month_end(year: int, month: int) -> date:
    return date(year, month, calendar.monthrange(year, month)[1])


def period(phrase: str, today: date) -> tuple[date, date] | None:
    """The first and last day of a period phrase (see _PERIOD); None when it is none."""
    words = phrase.lower().replace(".", "").replace(" of ", " ").split()
    if len(words) == 1 and re.fullmatch(_YEAR, words[0]):
        year = int(words[0])
        return (date(year, 1, 1), date(year, 12, 31)) if 1900 <= year <= today.year + 1 else None
    if words[0] in ("last", "this"):
        back = words[0] == "last"
        unit = words[1]
        if unit == "year":
            year = today.year - back
            return date(year, 1, 1), date(year, 12, 31)
        if unit == "month":
            first = today.replace(day=1)
            if back:
                first = (first - timedelta(days=1)).replace(day=1)
            return first, _month_end(first.year, first.month)
        if unit == "week":  # weeks start on Monday
            monday = today - timedelta(days=today.weekday() + 7 * back)
            return monday, monday + timedelta(days=6)
        if unit in SEASONS:  # last: the latest that has ended; this: the one under way, or this year's
            seasons = [_season(unit, year) for year in (today.year, today.year - 1, today.year - 2)]
            if back:
                return next(s for s in seasons if s[1] < today)
            return next((s for s in seasons if s[0] <= today <= s[1]), seasons[0])
        if unit in MONTHS:  # last: the latest that has ended; this: this year's
            month = MONTHS[unit]
            year = today.year - (back and month >= today.month)
            return date(year, month, 1), _month_end(year, month)
        return None
    name, year = words[0], int(words[-1])
    if name in SEASONS:
        return _season(name, year)
    return date(year, MONTHS[name], 1), _month_end(year, MONTHS[name])


def _season(name: str, year: int) -> tuple[date, date]:
    start, end = SEASONS[name]
    if start > end:  # winter: December of `year` to February of the next
        return date(year, start, 1), _month_end(year + 1, end)
    return date(year, start, 1), _month_end(year, end)


_RULES: list[tuple[str, str]] = [
    # between May and August 2023 (the year of the end, for both), between 2019 and 2021
    ("between", rf"\b(?:{_LEAD})?between\s+(?P<a>{_MONTH}|{_PERIOD})\s+and\s+(?P<b>{_PERIOD})\b"),
    ("between", rf"\b{_WHAT}from\s+(?P<a>{_MONTH}|{_PERIOD})\s+(?:to|until|till)\s+(?P<b>{_PERIOD})\b"),
    ("since", rf"\b(?:since|after)\s+(?P<a>{_PERIOD})\b"),
    ("before", rf"\b(?:before|until|till|up\s+to)\s+(?P<a>{_PERIOD})\b"),
    ("during", rf"(?<!the )\b(?:{_LEAD})?(?P<a>{_PERIOD})\b"),  # "the 1975" is a band
]
_ACCOUNT = re.compile(r"(?:^|\s)(?:by\s+|from\s+)?@(?P<a>[A-Za-z0-9._]{1,30})\b")
_HASHTAG = re.compile(r"(?:^|\s)#(?P<a>\w+)")
_LIKES = re.compile(r"\b(?:with\s+)?(?:(?P<over>over|more\s+than|above)|at\s+least|min(?:imum)?)\s+"
                    r"(?P<n>\d[\d,]*)\s+likes?\b|\b(?:with\s+)?(?P<m>\d[\d,]*)\s*(?:\+|or\s+more)\s+likes?\b",
                    re.IGNORECASE)


def parse(query: str, today: date) -> Parsed:
    """Read dates, @accounts, #hashtags and likes out of `query` (see the module doc)."""
    text, read = query, []
    since = until = None
    accounts, hashtags, likes = [], [], None

    def cut(match: re.Match) -> None:
        nonlocal text
        read.append(match.group(0).strip())
        text = text[:match.start()] + " " + text[match.end():]

    for match in list(_ACCOUNT.finditer(text))[::-1]:
        accounts.insert(0, match.group("a").rstrip("."))
        cut(match)
    for match in list(_HASHTAG.finditer(text))[::-1]:
        hashtags.insert(0, match.group("a").lower())
        cut(match)
    if match := _LIKES.search(text):
        count = int((match.group("n") or match.group("m")).replace(",", ""))
        likes = count + 1 if match.group("over") else count
        cut(match)
    for kind, pattern in _RULES:
        match = re.search(pattern, text, re.IGNORECASE)
        if not match:
            continue
        a = match.group("a")
        if kind == "between":
            end = period(match.group("b"), today)
            start = period(a, today) if not re.fullmatch(_MONTH, a, re.IGNORECASE) else (
                period(f"{a} {end[0].year}", today) if end else None)
            if not start or not end or end[1] < start[0]:
                break  # a range that is none: the query keeps it as text, and no other date
            since, until = start[0], end[1]
        else:
            found = period(a, today)
            if found is None:
                continue
            if kind == "since":
                since = found[0] if match.group(0).lower().startswith("since") else found[1] + timedelta(days=1)
            elif kind == "before":
                until = found[0] - timedelta(days=1) if match.group(0).lower().startswith("before") else found[1]
            else:
                since, until = found
        before = text
        cut(match)
        if re.search(_RULES[-1][1], text, re.IGNORECASE):  # two periods ("2019 2020"): which one?
            text, since, until = before, None, None
            read.pop()
        break
    words = " ".join(text.split())
    return Parsed(words, since, until, tuple(accounts), tuple(hashtags), likes, tuple(read))


def merge(parsed: Parsed, **explicit) -> Parsed:
    """`parsed` with every filter given explicitly (not None, not empty) in its place: what a
    person typed into a filter wins over what was read from the query."""
    return replace(parsed, **{k: (tuple(v) if isinstance(v, list) else v) for k, v in explicit.items() if v})


def read(text: str, filters: search.Filters, today: date, literal: bool = False
         ) -> tuple[Parsed, search.Filters]:
    """What to search and the filters to apply: those read from `text` (unless `literal`), with
    those given in `filters` in their place."""
    parsed = Parsed(text) if literal else parse(text, today)
    if not parsed.text:  # filters alone ("#sunset since 2025"): ranked by the words as typed
        parsed = replace(parsed, text=text)
    parsed = merge(parsed, since=filters.since, until=filters.until, accounts=filters.accounts,
                   hashtags=filters.hashtags, min_likes=filters.min_likes)
    return parsed, replace(filters, since=parsed.since, until=parsed.until, accounts=list(parsed.accounts),
                           hashtags=list(parsed.hashtags), min_likes=parsed.min_likes)
