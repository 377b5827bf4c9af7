"""Corpora, tokenizers, the token cache and batches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from adadepth.data import (
    Corpus,
    TokenData,
    build_tokenizer,
    cache_dir,
    load_corpus,
    load_tokenizer,
    prepare_tokens,
)
from adadepth.data.corpora import _take_documents
from adadepth.errors import UserError

TINY_VOCAB = 66  # the classic file has 65: this edition adds [ ] and lacks a stray "3"


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ADADEPTH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _fineweb_parquet(path: Path, texts: list[str]) -> Path:
    """A file with fineweb-edu's columns."""
    n = len(texts)
    table = pa.table(
        {
            "text": texts,
            "id": [f"<urn:uuid:{i}>" for i in range(n)],
            "dump": ["CC-MAIN-2024-10"] * n,
            "url": [f"https://example.org/{i}" for i in range(n)],
            "file_path": ["s3://bucket/file.warc.gz"] * n,
            "language": ["en"] * n,
            "language_score": [0.97] * n,
            "token_count": [len(t.split()) for t in texts],
            "score": [3.1] * n,
            "int_score": [3] * n,
        }
    )
    pq.write_table(table, path)
    return path


def test_cache_dir_follows_environment(_cache: Path) -> None:
    assert cache_dir() == _cache


def test_shakespeare_is_all_plays_as_plain_text() -> None:
    corpus = load_corpus("shakespeare")
    text = corpus.train[0] + corpus.val[0]
    assert len(corpus.train) == len(corpus.val) == 1
    assert 4_500_000 < len(text) < 5_200_000  # 38 plays, about 4.8M characters
    for marker in ("#", "_", "\\", "**"):
        assert marker not in text
    assert corpus.train[0].endswith("\n")  # cut at a newline
    assert abs(len(corpus.val[0]) / len(text) - 0.1) < 0.001
    assert "Hamlet" in text and "First Citizen:\nBefore we proceed" in text
    assert "Enter a company of mutinous Citizens" not in text  # a two-line stage direction
    assert "To COMINIUS" not in text
    assert "And [Censorinus,]\nnobly named so," in text  # inline markup keeps its words


def test_tiny_shakespeare_matches_the_classic_layout() -> None:
    corpus = load_corpus("tiny-shakespeare")
    train, val = corpus.train[0], corpus.val[0]
    data = train + val
    assert data.count("\n") == 40_000 and data.endswith("\n")
    assert data.split("\n")[0] == "First Citizen:"
    assert data.startswith(
        "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\n"
    )
    n = len(data)
    assert len(train) == int(n * 0.9) and len(val) == n - int(n * 0.9)  # nanoGPT's prepare.py
    assert (len(train), len(val)) == (1_011_399, 112_378)
    assert len(set(data)) == TINY_VOCAB
    assert build_tokenizer("char", corpus).vocab_size == TINY_VOCAB


def test_char_tokenizer_round_trip_and_reload(tmp_path: Path) -> None:
    corpus = Corpus("toy", ["hello world\n"], ["held\n"])
    tok = build_tokenizer("char", corpus)
    assert tok.is_char and tok.eos_id is None
    assert tok.vocab_size == len(set("hello world\nheld\n"))
    assert tok.encode("hello") == [tok.encode(c)[0] for c in "hello"]
    assert tok.decode(tok.encode("old hell\n")) == "old hell\n"
    tok.save(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert again.is_char and again.encode("world") == tok.encode("world")


def test_gpt2_tokenizer_offline(tmp_path: Path) -> None:
    tok = build_tokenizer("gpt2", None)
    assert (tok.vocab_size, tok.eos_id, tok.is_char) == (50257, 50256, False)
    assert tok.encode("Hello world") == [15496, 995]
    text = "First Citizen:\nBefore we proceed any further,  hear me speak.\n\n"
    assert tok.decode(tok.encode(text)) == text
    tok.save(tmp_path / "saved")
    assert load_tokenizer(tmp_path / "saved").encode("Hello world") == [15496, 995]


def test_hf_tokenizer_directory_by_path(tmp_path: Path) -> None:
    build_tokenizer("gpt2", None).hf.save_pretrained(str(tmp_path / "hf"))
    tok = build_tokenizer(str(tmp_path / "hf"), None)
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.decode([15496, 995]) == "Hello world"
    assert tok.vocab_size == 50257


def test_local_text_file_splits_by_characters(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("".join(f"line {i}\n" for i in range(100)), encoding="utf-8")
    corpus = load_corpus(str(path))
    assert len(corpus.train) == len(corpus.val) == 1
    assert corpus.train[0] + corpus.val[0] == path.read_text(encoding="utf-8")
    assert corpus.train[0].endswith("\n")


def test_local_jsonl_and_folder_split_by_document(tmp_path: Path) -> None:
    rows = [{"text": f"document {i}", "id": i} for i in range(20)]
    jsonl = tmp_path / "docs" / "a.jsonl"
    jsonl.parent.mkdir()
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    corpus = load_corpus(str(jsonl))
    assert corpus.train == [f"document {i}" for i in range(18)]
    assert corpus.val == ["document 18", "document 19"]
    (tmp_path / "docs" / "b.txt").write_text("a last document", encoding="utf-8")
    folder = load_corpus(str(tmp_path / "docs"), max_docs=10)
    assert folder.train + folder.val == [f"document {i}" for i in range(10)]
    assert load_corpus(str(tmp_path / "docs")).val[-1] == "a last document"


def test_local_parquet_streams_through_datasets(tmp_path: Path) -> None:
    import datasets

    texts = [f"An educational page number {i}." for i in range(30)]
    path = _fineweb_parquet(tmp_path / "fineweb.parquet", texts)
    stream = datasets.load_dataset("parquet", data_files=str(path), split="train", streaming=True)
    assert _take_documents(stream, "text", 7) == texts[:7]
    corpus = load_corpus(str(path), val_fraction=0.2)
    assert corpus.train == texts[:24] and corpus.val == texts[24:]
    assert load_corpus(str(path), max_docs=10).val == texts[9:10]


def test_a_hub_dataset_streams_once_then_reads_from_the_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    texts = [f"An educational page number {i}." for i in range(30)]
    local = _fineweb_parquet(tmp_path / "fineweb.parquet", texts)
    real_load, calls = datasets.load_dataset, []

    def hub_from_a_local_file(repo: str, config: str | None, split: str, streaming: bool):
        """The hub's fineweb-edu, served by a local file with its columns (no network)."""
        calls.append((repo, config, split, streaming))
        return real_load("parquet", data_files=str(local), split=split, streaming=streaming)

    monkeypatch.setattr(datasets, "load_dataset", hub_from_a_local_file)
    first = load_corpus("HuggingFaceFW/fineweb-edu:sample-10BT", max_docs=20)
    again = load_corpus("HuggingFaceFW/fineweb-edu:sample-10BT", max_docs=20)
    assert calls == [("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True)]
    assert first.train + first.val == texts[:20] and again == first
    load_corpus("HuggingFaceFW/fineweb-edu:sample-10BT", max_docs=25)  # another slice: streamed
    assert len(calls) == 2


def test_token_cache_is_reused(monkeypatch: pytest.MonkeyPatch, _cache: Path) -> None:
    corpus = Corpus("toy", ["abcabc", "cab"], ["bca"])
    tok = build_tokenizer("char", corpus)
    first = prepare_tokens(corpus, tok)
    assert first.train.dtype == np.uint16 and list(first.val) == tok.encode("bca")
    assert first.train.tolist() == tok.encode("abcabccab")  # char models get no eos

    def fail(text: str) -> list[int]:
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(tok, "encode", fail)
    second = prepare_tokens(corpus, tok)
    assert isinstance(second.train, np.memmap)
    assert second.train.tolist() == first.train.tolist() and second.vocab_size == 3
    assert not [p for p in _cache.rglob(".*") if p.is_file()]  # no temp files left behind


def test_gpt2_tokens_end_documents_with_eos() -> None:
    corpus = Corpus("docs", ["Hello world", "Hello"], ["world"])
    data = prepare_tokens(corpus, build_tokenizer("gpt2", None))
    assert data.train.tolist() == [15496, 995, 50256, 15496, 50256]
    assert data.val.tolist() == [6894, 50256]


def test_batches_are_deterministic_windows() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    data = TokenData(train=tokens, val=tokens[:100], vocab_size=1000)
    x, y = data.get_batch("train", 4, 16, torch.Generator().manual_seed(0))
    x2, y2 = data.get_batch("train", 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.equal(y, x + 1)  # targets are the inputs shifted by one token
    batches = list(data.eval_batches("val", 2, 10))
    xs = torch.cat([bx for bx, _ in batches])
    assert xs.shape == (9, 10)  # 99 targets hold 9 whole windows
    assert torch.equal(xs.flatten(), torch.arange(90))
    assert len(list(data.eval_batches("val", 2, 10, max_batches=2))) == 2


def test_bad_inputs_raise_user_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café".encode("latin-1"))
    no_field = tmp_path / "rows.jsonl"
    no_field.write_text('{"content": "x"}\n{"content": "y"}\n')
    not_json = tmp_path / "bad.jsonl"
    not_json.write_text("{not json\n")
    no_column = tmp_path / "table.parquet"
    pq.write_table(pa.table({"body": ["a", "b"]}), no_column)
    odd = tmp_path / "notes.csv"
    odd.write_text("a,b\n")
    for name, kwargs in [
        ("no-such-corpus", {}),
        (str(tmp_path / "missing.txt"), {}),
        (str(empty), {}),
        (str(latin), {}),
        (str(no_field), {}),
        (str(not_json), {}),
        (str(no_column), {}),
        (str(odd), {}),
        (str(tmp_path / "docs"), {}),
        ("tiny-shakespeare", {"val_fraction": 1.5}),
    ]:
        (tmp_path / "docs").mkdir(exist_ok=True)  # a folder with nothing to read
        with pytest.raises(UserError):
            load_corpus(name, **kwargs)

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach 'HuggingFaceFW/fineweb-edu' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match="could not load Hugging Face dataset"):
        load_corpus("HuggingFaceFW/fineweb-edu:sample-10BT", max_docs=100)

    with pytest.raises(UserError):
        build_tokenizer("sentencepiece-please", None)
    with pytest.raises(UserError):
        build_tokenizer("char", None)
    with pytest.raises(UserError):
        build_tokenizer(str(tmp_path / "docs"), None)  # a folder with no tokenizer in it
    with pytest.raises(UserError):
        load_tokenizer(tmp_path / "docs")
    tok = build_tokenizer("char", Corpus("toy", ["ab"], ["ba"]))
    with pytest.raises(UserError):
        tok.encode("abc")

    data = TokenData(
        train=np.arange(50, dtype=np.uint16), val=np.arange(8, dtype=np.uint16), vocab_size=50
    )
    with pytest.raises(UserError, match="corpus too short"):
        data.check_block(8)
    data.check_block(7)
    with pytest.raises(UserError, match="corpus too short"):
        data.get_batch("val", 2, 8, torch.Generator())
    with pytest.raises(UserError):
        data.get_batch("test", 2, 4, torch.Generator())
    with pytest.raises(UserError):
        data.get_batch("train", 0, 4, torch.Generator())


def test_a_tokenizer_that_adds_bos_starts_every_window_with_it(tmp_path) -> None:
    """Windows begin as the model's tokenizer begins a document: with its BOS when it adds
    one (then each window's first target is the stream token the BOS precedes, and consecutive
    evaluation windows still score every token once); with nothing otherwise."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from adadepth.data.tokenizers import HFTokenizer

    vocab = {"<s>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate("abcdefgh ")}}
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="a"))
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    raw.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", 0)])
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>")
    tok = HFTokenizer(hf, "bos-test")
    assert tok.bos_id == 0 and tok.encode("ab") == [2, 3]
    corpus = Corpus("bos-test", ["abcdefgh " * 40], ["hgfedcba " * 40])
    data = prepare_tokens(corpus, tok)
    assert data.bos == 0
    x, y = next(data.eval_batches("val", 2, 8))
    stream = torch.from_numpy(data.val.astype("int64"))
    assert (x[:, 0] == 0).all() and torch.equal(y[0], stream[:8])
    assert torch.equal(y[1], stream[8:16])
    assert torch.equal(x[0, 1:], stream[:7])
    assert (data.windows("val", 5, 3)[:, 0] == 0).all()
    xb, _ = data.get_batch("train", 3, 6, torch.Generator().manual_seed(0))
    assert (xb[:, 0] == 0).all()
    plain = HFTokenizer(PreTrainedTokenizerFast(tokenizer_object=RawTokenizer(
        models.WordLevel(vocab, unk_token="a")), bos_token="<s>", eos_token="</s>"), "no-bos")
    assert plain.bos_id is None
