import polars as pl
import pytest

from tests.conftest import jsonl, write
from userllm.data.prepare import prepare_dataset
from userllm.data.readers.amazon import read_amazon
from userllm.data.readers.common import ReadContext
from userllm.data.readers.google_local import read_google_local
from userllm.data.skips import SkipLog
from userllm.errors import InputError, MalformedRowError


def review14(user, asin, t, rating=5.0):
    return {
        "reviewerID": user,
        "asin": asin,
        "overall": rating,
        "unixReviewTime": t,
        "reviewText": f"{user} on {asin}",
        "summary": "ok",
        "helpful": [0, 0],
        "reviewTime": "01 1, 2014",
    }


def read_amz(*paths, strict=False):
    skips = SkipLog(strict=strict)
    return read_amazon(list(paths), ReadContext(skips)), skips


def test_amazon_2014_python_literal_meta_gzip(tmp_path):
    write(
        tmp_path / "reviews_Books_5.json.gz",
        jsonl([review14("A1", "B1", 100), review14("A1", "B2", 200), "{not json", review14("A2", "B1", 50)]),
    )
    meta = [
        "{'asin': 'B1', 'title': 'Dune', 'categories': [['Books', 'Science Fiction', 'Classics']], "
        "'description': 'Spice.'}",
        "{'asin': 'B2', 'categories': [['Books', 'Poetry']], 'related': {'also_bought': ['B1']}}",
    ]
    write(tmp_path / "meta_Books.json.gz", "\n".join(meta) + "\n")
    raw, skips = read_amz(tmp_path)
    assert raw.layout == "2014"
    assert raw.events.height == 3 and skips.counts == {"invalid JSON": 1}
    assert "reviews_Books_5.json.gz:3:" in skips.examples["invalid JSON"][0]
    items = {r["item_id"]: r for r in raw.items.iter_rows(named=True)}
    assert items["B1"]["title"] == "Dune" and items["B1"]["categories"] == ["Science Fiction", "Classics"]
    assert items["B2"]["categories"] == ["Poetry"]
    assert raw.events.row(0, named=True)["text"] == "A1 on B1"


def test_amazon_2018_layout(tmp_path):
    rec = {
        "reviewerID": "A1",
        "asin": "B1",
        "overall": 4.0,
        "unixReviewTime": 1500000000,
        "reviewText": "good",
        "summary": "s",
        "verified": True,
        "vote": "2",
    }
    write(tmp_path / "Books.json", jsonl([rec, {**rec, "asin": "B2", "unixReviewTime": 1500000100}]))
    write(
        tmp_path / "meta_Books.json",
        jsonl([{"asin": "B1", "title": "T1", "category": ["Books", "Mystery"], "description": ["a", "b"]}]),
    )
    raw, _ = read_amz(tmp_path)
    assert raw.layout == "2018"
    item = raw.items.row(0, named=True)
    assert item["categories"] == ["Mystery"] and item["description"] == "a\nb"


def test_amazon_2023_layout_ms_timestamps(tmp_path):
    rec = {
        "user_id": "U1",
        "parent_asin": "P1",
        "asin": "X",
        "rating": 5.0,
        "timestamp": 1588687728923,
        "text": "great",
        "title": "Five stars",
    }
    write(tmp_path / "All_Beauty.jsonl.gz", jsonl([rec, {**rec, "rating": "bad"}, {**rec, "user_id": None}]))
    write(
        tmp_path / "meta_All_Beauty.jsonl.gz",
        jsonl(
            [{"parent_asin": "P1", "title": "Soap", "main_category": "All Beauty", "categories": [], "description": []}]
        ),
    )
    raw, skips = read_amz(tmp_path)
    assert raw.layout == "2023"
    ev = raw.events.row(0, named=True)
    assert ev["timestamp"] == 1588687728 and ev["summary"] == "Five stars"
    assert skips.counts == {"non-numeric rating": 1, "missing required field": 1}
    assert raw.items.row(0, named=True)["categories"] == ["All Beauty"]


def test_amazon_strict_and_unknown_fields(tmp_path):
    write(tmp_path / "Books.json", jsonl([review14("A1", "B1", 1), "[1, 2]"]))
    with pytest.raises(MalformedRowError, match=r"Books\.json:2: invalid JSON"):
        read_amz(tmp_path, strict=True)
    write(tmp_path / "Books.json", jsonl([{"who": 1, "what": 2}]))
    with pytest.raises(InputError, match="match no Amazon layout"):
        read_amz(tmp_path)


def test_amazon_missing_reviews(tmp_path):
    write(tmp_path / "meta_Books.json", "{}\n")
    with pytest.raises(InputError, match=r"no Amazon review file .*found: meta_Books\.json.*2023: <Cat>\.jsonl"):
        read_amz(tmp_path)


def test_google_local(tmp_path):
    recs = [
        {"user_id": "101", "name": "Ann", "time": 1600000000000, "rating": 4, "text": None, "gmap_id": "G1"},
        {"user_id": "101", "name": "Ann", "time": 1600000500000, "rating": 5, "text": "Nice", "gmap_id": "G2"},
        {"user_id": "102", "time": "soon", "rating": 5, "gmap_id": "G2"},
    ]
    write(tmp_path / "review-Vermont_10.json.gz", jsonl(recs))
    write(
        tmp_path / "meta-Vermont.json.gz",
        jsonl([{"gmap_id": "G1", "name": "Cafe", "category": ["Cafe", "Bakery"], "description": None}]),
    )
    skips = SkipLog()
    raw = read_google_local([tmp_path], ReadContext(skips))
    assert raw.layout == "google-local"
    assert raw.events.get_column("timestamp").to_list() == [1600000000, 1600000500]
    assert raw.events.get_column("text").to_list() == [None, "Nice"]
    assert skips.counts == {"bad timestamp": 1}
    assert raw.items.row(0, named=True)["categories"] == ["Cafe", "Bakery"]
    with pytest.raises(InputError, match="no Google Local review file"):
        read_google_local([tmp_path / "meta-Vermont.json.gz"], ReadContext(SkipLog()))


def test_amazon_metadata_html_repeated_ids_and_titles_that_are_only_markup(tmp_path, cfg_for):
    rec = {"reviewerID": "A1", "asin": "B1", "overall": 4.0, "unixReviewTime": 1500000000, "reviewText": "ok"}
    write(
        tmp_path / "Gift_Cards.json",
        jsonl([{**rec, "asin": a, "unixReviewTime": 1500000000 + k} for k, a in enumerate(["B1", "B2", "B3", "B4"])]),
    )
    meta = [
        {
            "asin": "B1",
            "title": "Chili&#39;s Grill &amp; Bar <b>Gift</b> Card",
            "category": ["Gift Cards", "Entertainment &amp; Pop Culture", "</span></span>"],
            "description": ["<div>Fun &amp; food</div>", ""],
        },
        {"asin": "B2", "title": '<span class="a-size-medium a-color-secondary"', "category": []},
        {"asin": "B3", "title": "", "category": ["Gift Cards", "Restaurants"]},
        {"asin": "B3", "title": "Double &amp;#39;escaped&amp;#39;", "category": ["Gift Cards", "Later"]},
        {"asin": "B1", "title": "a later record of B1", "description": ["ignored"]},
    ]
    write(tmp_path / "meta_Gift_Cards.json", jsonl(meta))
    raw, _ = read_amz(tmp_path)
    items = {r["item_id"]: r for r in raw.items.iter_rows(named=True)}
    assert items["B1"]["title"] == "Chili's Grill & Bar Gift Card" and items["B1"]["description"] == "Fun & food"
    assert items["B1"]["categories"] == ["Entertainment & Pop Culture"]
    assert items["B2"]["title"] is None and items["B2"]["title_note"] == "markup only"
    assert items["B3"]["title"] == "Double 'escaped'" and items["B3"]["categories"] == [
        "Restaurants"
    ]  # first non-empty wins
    assert raw.merged_items == 2 and len(items) == 3

    m = prepare_dataset(cfg_for("amazon", tmp_path, min_user_events=0))
    assert m["item_titles"]["source"] == {"markup only": 1, "metadata": 2, "no metadata record": 1}
    assert m["item_titles"]["metadata_records_merged"] == 2
    titles = dict(pl.read_parquet(tmp_path / "out" / "items.parquet").select("item_id", "title").iter_rows())
    assert titles["B2"] == "item B2 (no title)" and titles["B4"] == "item B4 (no title)"


def test_truncated_gzip_in_google_local_keeps_complete_records(tmp_path):
    recs = [
        {
            "user_id": f"u{k % 3}",
            "gmap_id": f"G{k % 7}",
            "rating": 4,
            "time": 1600000000000 + k * 1000,
            "text": "x" * 40,
        }
        for k in range(3000)
    ]
    path = write(tmp_path / "review-Vermont.json.gz", jsonl(recs))
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    skips = SkipLog()
    raw = read_google_local([path], ReadContext(skips))
    assert 0 < raw.events.height < 3000 and skips.counts == {"truncated_file": 1}
    assert f"review-Vermont.json.gz:{raw.events.height + 1}:" in skips.examples["truncated_file"][0]
    with pytest.raises(MalformedRowError, match=rf"review-Vermont\.json\.gz:{raw.events.height + 1}: truncated_file"):
        read_google_local([path], ReadContext(SkipLog(strict=True)))
