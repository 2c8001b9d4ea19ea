import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rankcut.data import bos_per_window, load_text, sample_calibration, split_windows
from rankcut.errors import ConfigError, DataNotFoundError


def test_wikitext_rows_follow_the_hf_split(data_dir):
    corpus = load_text("wikitext2", "test", data_dir=data_dir)
    assert len(corpus.rows) == 4358
    assert sum(1 for row in corpus.rows if row) == 2891
    assert corpus.rows[0] == "" and corpus.rows[1] == " = Robert Boulter = \n"
    assert not corpus.documents and corpus.source.endswith("wiki.test.raw")


def test_named_datasets_resolve_from_env(data_dir):
    # RANKCUT_DATA is set by the autouse fixture
    assert load_text("wikitext2", "validation").rows[1].startswith(" = Homarus gammarus")
    ptb = load_text("ptb", "valid")
    assert len(ptb.rows) == 3370 and ptb.rows[0] == ptb.rows[0].strip()
    c4 = load_text("c4", "validation")
    assert len(c4.rows) == 2000 and c4.documents


def test_missing_dataset_lists_every_place_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKCUT_DATA", str(tmp_path))
    with pytest.raises(DataNotFoundError) as error:
        load_text("wikitext2", "test")
    message = str(error.value)
    assert str(tmp_path / "wikitext-2-raw" / "wiki.test.raw") in message
    assert "hub" in message.lower()
    with pytest.raises(DataNotFoundError, match="unknown dataset 'nosuchset'"):
        load_text("nosuchset")


def test_file_paths(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\nsecond line\n")
    assert load_text(tmp_path / "a.txt").rows == ["first line\n", "", "second line\n"]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ["x y", "z"]) + "\n")
    assert load_text(tmp_path / "b.jsonl").rows == ["x y", "z"]
    pq.write_table(pa.table({"text": ["p", "q"]}), tmp_path / "c.parquet")
    corpus = load_text(tmp_path / "c.parquet")
    assert corpus.rows == ["p", "q"] and corpus.documents
    (tmp_path / "bad.jsonl").write_text('{"no_text": 1}\n')
    with pytest.raises(DataNotFoundError, match="bad.jsonl:1"):
        load_text(tmp_path / "bad.jsonl")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataNotFoundError, match="cannot read"):
        load_text(tmp_path / "broken.parquet")
    with pytest.raises(DataNotFoundError, match="not found"):
        load_text(tmp_path / "missing.txt")


def test_calibration_sampler(word_tokenizer, data_dir):
    wiki = load_text("wikitext2", "validation", data_dir=data_dir)
    first = sample_calibration(word_tokenizer, wiki, 8, 32, seed=0)
    assert first.shape == (8, 32)
    assert torch.equal(first, sample_calibration(word_tokenizer, wiki, 8, 32, seed=0))
    assert not torch.equal(first, sample_calibration(word_tokenizer, wiki, 8, 32, seed=1))
    c4 = load_text("c4", "validation", data_dir=data_dir)
    docs = sample_calibration(word_tokenizer, c4, 4, 64, seed=0)
    assert docs.shape == (4, 64)
    with pytest.raises(ConfigError, match="documents of at least"):
        sample_calibration(word_tokenizer, c4, 4, 100_000, seed=0)
    with pytest.raises(ConfigError, match="fewer than"):
        sample_calibration(word_tokenizer, wiki, 10_000, 512, seed=0)


def test_bos_rule_follows_the_tokenizer(word_tokenizer):
    assert bos_per_window(word_tokenizer) is None  # this tokenizer adds no BOS
    ids = torch.arange(10)
    assert split_windows(ids, 4, None).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert split_windows(ids, 4, 99).tolist() == [[99, 0, 1, 2], [99, 3, 4, 5], [99, 6, 7, 8]]
