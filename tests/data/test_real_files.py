"""``userllm prepare`` on real Amazon Reviews 2018 files as released (read in place from the shared data
folder): three 5-core review files, the Gift_Cards metadata with its HTML entities, and a real gzip file cut
short at a byte offset (a partial download)."""

import json
import zlib

import polars as pl
import pytest

from tests.conftest import real_file
from userllm.config import PrepareConfig
from userllm.data.dataset import PreparedDataset
from userllm.data.prepare import prepare_dataset
from userllm.data.readers.amazon import read_amazon
from userllm.data.readers.common import ReadContext
from userllm.data.skips import SkipLog

AMAZON = "amazon-reviews-2018"
ENTITY = r"&(#\d+|#x[0-9a-fA-F]+|[a-zA-Z]+);|<[A-Za-z/]"  # an HTML entity or tag left in a text


@pytest.mark.parametrize(
    "name,users,items", [("Gift_Cards_5", 458, 148), ("AMAZON_FASHION_5", 406, 31), ("Appliances_5", 47, 48)]
)
def test_real_5core_files_prepare_end_to_end(tmp_path, name, users, items):
    reviews = real_file(f"{AMAZON}/{name}.json.gz")
    paths = [reviews] + ([real_file(f"{AMAZON}/meta_Gift_Cards.json.gz")] if name == "Gift_Cards_5" else [])
    m = prepare_dataset(PrepareConfig(source="amazon", paths=paths, out=tmp_path / "ds"))
    assert m["format"] == "2018" and m["skipped"]["total"] == 0 and m["warnings"] == []
    assert m["input_counts"]["users"] == users and m["input_counts"]["items"] == items  # as the README counts them
    ds = PreparedDataset(tmp_path / "ds")
    titles = ds.items.get_column("title").to_list()
    if name == "Gift_Cards_5":  # every reviewed item has a metadata record
        assert m["item_titles"]["source"] == {"metadata": items}
        assert not [t for t in titles if pl.Series([t]).str.contains(ENTITY)[0]]
        assert "Noodles & Company Gift Card" in titles  # `Noodles &amp; Company Gift Card` in the file
    else:  # no metadata file: every title is the marked fallback
        assert m["item_titles"]["source"] == {"no metadata record": m["final_counts"]["items"]}
        assert all(t == f"item {i} (no title)" for t, i in zip(titles, ds.items.get_column("item_id")))
    assert ds.events.filter(pl.col("text").is_not_null()).height > 0.99 * ds.events.height


def test_real_metadata_is_unescaped_and_stripped_of_tags():
    meta = real_file(f"{AMAZON}/meta_Gift_Cards.json.gz")
    raw = read_amazon([real_file(f"{AMAZON}/Gift_Cards_5.json.gz"), meta], ReadContext(SkipLog()))
    items = {r["item_id"]: r for r in raw.items.iter_rows(named=True)}
    assert len(items) == 1547 and raw.merged_items == 0
    texts = [t for r in items.values() for t in [r["title"], r["description"], *r["categories"]] if t]
    left = [t for t in texts if pl.Series([t]).str.contains(ENTITY)[0]]
    assert not left, left[:3]
    titles = {r["title"] for r in items.values()}
    assert "Amazon eGift Card - Feliz Cumpleaños (Cupcakes)" in titles  # `Cumplea&ntilde;os`
    assert "Chili's Grill & Bar Yellow Gift Cards Configuration Asin - E-mail Delivery" in titles
    cats = {c for r in items.values() for c in r["categories"]}
    assert "</span></span></span>" not in cats and "" not in cats  # a category that was only tags is dropped


def truncated_copy(src, dst, offset: int) -> int:
    """Write the first ``offset`` bytes of gzip file ``src`` to ``dst``; the number of complete lines in
    them (decompressed with zlib directly, independently of the readers)."""
    data = src.read_bytes()[:offset]
    dst.write_bytes(data)
    return zlib.decompressobj(wbits=31).decompress(data).count(b"\n")


def test_real_truncated_gzip_keeps_the_complete_lines_and_says_so(tmp_path, run_cli):
    src = real_file(f"{AMAZON}/Gift_Cards_5.json.gz")
    (tmp_path / "in").mkdir()
    cut = tmp_path / "in" / "Gift_Cards_5.json.gz"
    lines = truncated_copy(src, cut, 100_000)
    assert 0 < lines < 2972
    skips = SkipLog()
    raw = read_amazon([cut], ReadContext(skips))
    full = read_amazon([src], ReadContext(SkipLog())).events
    assert raw.events.height == lines and raw.events.equals(full.head(lines))
    assert (
        skips.counts == {"truncated_file": 1}
        and f"Gift_Cards_5.json.gz:{lines + 1}:" in skips.examples["truncated_file"][0]
    )

    code, _, stderr = run_cli("prepare", "--source", "amazon", cut, "--out", tmp_path / "ds")
    assert code == 0, stderr
    said = " ".join(stderr.split())
    assert "warning:" in said and "Gift_Cards_5.json.gz is incomplete" in said and f"after line {lines:,}" in said
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert manifest["skipped"]["by_reason"]["truncated_file"]["count"] == 1 and len(manifest["warnings"]) == 1
    assert manifest["input_counts"]["events"] == lines

    code, _, stderr = run_cli("prepare", "--source", "amazon", cut, "--out", tmp_path / "strict", "--strict")
    said = " ".join(stderr.split())
    assert code == 2 and f"Gift_Cards_5.json.gz:{lines + 1}: truncated_file" in said and "Aborted" not in said
    assert "Traceback" not in stderr and not (tmp_path / "strict").exists()
