"""Query understanding: dates, @accounts, #hashtags and likes read from what people type, and
what must stay text. The date is fixed: Monday 7 December 2026."""

from datetime import date

import pytest

from clipgram import catalog, query, search

TODAY = date(2026, 12, 7)
D = date.fromisoformat

# (query, text searched, since, until, accounts, hashtags, min_likes)
CASES = [
    ("beach in July 2023 by @nasa", "beach", "2023-07-01", "2023-07-31", ["nasa"], [], None),
    ("sunset photos from 2019", "sunset", "2019-01-01", "2019-12-31", [], [], None),
    ("dog at the park last summer", "dog at the park", "2026-06-01", "2026-08-31", [], [], None),
    ("snow last winter", "snow", "2025-12-01", "2026-02-28", [], [], None),  # this winter is under way
    ("christmas tree this month", "christmas tree", "2026-12-01", "2026-12-31", [], [], None),
    ("birthday cake last month", "birthday cake", "2026-11-01", "2026-11-30", [], [], None),
    ("hiking between May and August 2023", "hiking", "2023-05-01", "2023-08-31", [], [], None),
    ("concert from March 2022 to June 2022", "concert", "2022-03-01", "2022-06-30", [], [], None),
    ("wedding in June 2024", "wedding", "2024-06-01", "2024-06-30", [], [], None),
    ("graduation 2025", "graduation", "2025-01-01", "2025-12-31", [], [], None),
    ("cats since March 2024", "cats", "2024-03-01", None, [], [], None),
    ("beach after 2020", "beach", "2021-01-01", None, [], [], None),
    ("before 2020 mountains", "mountains", None, "2019-12-31", [], [], None),
    ("until 2018 old car", "old car", None, "2018-12-31", [], [], None),
    ("paris in spring 2023", "paris", "2023-03-01", "2023-05-31", [], [], None),
    ("autumn leaves in fall 2021", "autumn leaves", "2021-09-01", "2021-11-30", [], [], None),
    ("fall 2021 leaves", "leaves", "2021-09-01", "2021-11-30", [], [], None),
    ("road trip in winter 2022", "road trip", "2022-12-01", "2023-02-28", [], [], None),
    ("kitchen in summer of 2022", "kitchen", "2022-06-01", "2022-08-31", [], [], None),
    ("beach in Sept 2023", "beach", "2023-09-01", "2023-09-30", [], [], None),
    ("beach in sept. 2023", "beach", "2023-09-01", "2023-09-30", [], [], None),
    ("photos taken in 2022 at the lake", "photos at the lake", "2022-01-01", "2022-12-31", [], [], None),
    ("between 2019 and 2021 family", "family", "2019-01-01", "2021-12-31", [], [], None),
    ("from 2020 until 2021 garden", "garden", "2020-01-01", "2021-12-31", [], [], None),
    ("new year 2024", "new year", "2024-01-01", "2024-12-31", [], [], None),
    ("@natgeo lions", "lions", None, None, ["natgeo"], [], None),
    ("lions by @natgeo", "lions", None, None, ["natgeo"], [], None),
    ("@nasa @esa rockets in 2024", "rockets", "2024-01-01", "2024-12-31", ["nasa", "esa"], [], None),
    ("#travel #beach boat", "boat", None, None, [], ["travel", "beach"], None),
    ("food #foodporn with over 500 likes", "food", None, None, [], ["foodporn"], 501),
    ("dog with at least 1000 likes", "dog", None, None, [], [], 1000),
    ("1000+ likes sunset", "sunset", None, None, [], [], 1000),
    ("cat 200 or more likes", "cat", None, None, [], [], 200),
    ("selfie with more than 1,000 likes", "selfie", None, None, [], [], 1001),
    ("mountains with over 100 likes in 2023 by @alps", "mountains", "2023-01-01", "2023-12-31", ["alps"], [], 101),
    # filters alone: the words stay to rank by
    ("2023", "", "2023-01-01", "2023-12-31", [], [], None),
    ("in 2024", "", "2024-01-01", "2024-12-31", [], [], None),
    ("pictures from last year", "", "2025-01-01", "2025-12-31", [], [], None),
    ("last week", "", "2026-11-30", "2026-12-06", [], [], None),
    ("this year", "", "2026-01-01", "2026-12-31", [], [], None),
    ("this summer", "", "2026-06-01", "2026-08-31", [], [], None),
    ("last July", "", "2026-07-01", "2026-07-31", [], [], None),
    ("#sunset since 2025", "", "2025-01-01", None, [], ["sunset"], None),
    # not filters: a month or season without a year, a band, numbers that are no year, two years
    ("summer dress", "summer dress", None, None, [], [], None),
    ("may flowers", "may flowers", None, None, [], [], None),
    ("march madness", "march madness", None, None, [], [], None),
    ("spring rolls", "spring rolls", None, None, [], [], None),
    ("winter coat", "winter coat", None, None, [], [], None),
    ("fall colors", "fall colors", None, None, [], [], None),
    ("the 1975 concert", "the 1975 concert", None, None, [], [], None),
    ("red car 1850", "red car 1850", None, None, [], [], None),
    ("top 10", "top 10", None, None, [], [], None),
    ("iphone 12 photos", "iphone 12 photos", None, None, [], [], None),
    ("room 2040", "room 2040", None, None, [], [], None),
    ("2019 2020", "2019 2020", None, None, [], [], None),
    ("between 2021 and 2019", "between 2021 and 2019", None, None, [], [], None),
    ("year of the dragon", "year of the dragon", None, None, [], [], None),
    ("last christmas", "last christmas", None, None, [], [], None),
    ("a red square", "a red square", None, None, [], [], None),
    ('"quoted text" 2:sunset -night', '"quoted text" 2:sunset -night', None, None, [], [], None),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_the_query_is_read_as_people_mean_it(case):
    text, since, until, accounts, hashtags, likes = case[1:]
    parsed = query.parse(case[0], TODAY)
    assert (parsed.text, parsed.since, parsed.until, list(parsed.accounts), list(parsed.hashtags),
            parsed.min_likes) == (text, since and D(since), until and D(until), accounts, hashtags, likes)


def test_there_are_sixty_cases_of_which_a_quarter_must_stay_text():
    assert len(CASES) >= 60
    assert sum(c[1] == c[0] for c in CASES) >= 15


def test_typed_filters_win_and_literal_reads_nothing():
    typed = search.Filters(since=D("2020-01-01"), accounts=["mine"])
    parsed, filters = query.read("beach in July 2023 by @nasa #sea", typed, TODAY)
    assert (filters.since, filters.until, filters.accounts, filters.hashtags) == (
        D("2020-01-01"), D("2023-07-31"), ["mine"], ["sea"])
    assert parsed.says() == "searching 'beach' in posts from 2020-01-01 to 2023-07-31 by @mine tagged #sea"
    parsed, filters = query.read("beach in July 2023 by @nasa", search.Filters(), TODAY, literal=True)
    assert parsed.text == "beach in July 2023 by @nasa" and not filters
    parsed, filters = query.read("pictures from last year", search.Filters(), TODAY)
    assert parsed.text == "pictures from last year" and filters.since == D("2025-01-01")


def test_the_cli_searches_what_it_read(ingested_sample, capsys):
    import json

    from clipgram.cli import main

    base = ["--data-dir", str(ingested_sample.data_dir), "--clip-model", "tiny", "--captioner", "tiny",
            "--device", "cpu", "--json", "-k", "50"]
    assert main(["search", "a red shape #square", *base]) == 0
    hits = json.loads(capsys.readouterr().out)
    con = catalog.connect(ingested_sample.data_dir)
    tagged = {m for m, in con.execute("SELECT media_id FROM images WHERE list_contains(hashtags, 'square')").fetchall()}
    assert hits and {h["media_id"] for h in hits} <= tagged
    assert main(["search", "a red shape #square", "--literal", *base]) == 0
    assert len(json.loads(capsys.readouterr().out)) > len(hits)
