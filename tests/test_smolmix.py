"""smol-mix: SmolLM2's in-domain corpus, built offline from the installed packages."""

from __future__ import annotations

import ast
import socket
from collections import Counter

import pytest

from adadepth.data import cache_dir, load_corpus
from adadepth.data import smolmix as sm
from adadepth.errors import UserError

# characters of each part (train + val) with the shares of smolmix.PARTS of 3,000,000
SIZES = {"prose": (1_500_000, 2_000_000), "code": (700_000, 900_000), "math": (420_000, 560_000)}


@pytest.fixture(scope="module")
def docs() -> dict[str, list[tuple[str, str]]]:
    """Every part's documents, built once with the network shut (later loads read the cache)."""
    patch = pytest.MonkeyPatch()

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("the network is off in this test")

    patch.setattr(socket.socket, "connect", refuse)
    try:
        return sm.documents(cache_dir() / "corpora")
    finally:
        patch.undo()


def test_every_part_is_there_with_a_sane_size(docs) -> None:
    assert list(docs) == list(sm.PARTS)
    for part, (low, high) in SIZES.items():
        chars = sum(len(text) for _, text in docs[part])
        assert low < chars < high, (part, chars)
        assert all(name.startswith(f"{part}:") for name, _ in docs[part])
        names = [name for name, _ in docs[part]]
        assert len(set(names)) == len(names) > 40
    sources = Counter(name.split("/")[0] for part in docs.values() for name, _ in part)
    for source in ("prose:python-reference", "prose:python-stdlib", "code:python-stdlib",
                   "math:sympy", "math:mpmath", "math:numpy", "math:networkx"):
        assert sources[source] > 0, source


def test_parts_hold_what_they_say(docs) -> None:
    for _, text in docs["code"]:
        ast.parse(text)  # whole source files
    assert all(sm._MATH.search(text) for _, text in docs["math"])
    assert not any(sm._MATH.search(text) for _, text in docs["prose"])
    everything = [name for part in docs.values() for name, _ in part]
    assert not any("/tests/" in name or "/test/" in name for name in everything)
    # the reference topics repeat each other; each paragraph is kept once
    prose = "\n".join(text for _, text in docs["prose"])
    assert prose.count('The "while" statement is used for repeated execution') == 1
    # a stdlib module gives its source to code or its docstrings to prose, never both
    code_modules = {name.split("/", 1)[1] for name, _ in docs["code"]}
    prose_modules = {name.split("/", 1)[1].split("#")[0] for name, _ in docs["prose"]
                     if name.startswith("prose:python-stdlib/")}
    assert code_modules and prose_modules and not code_modules & prose_modules


def test_split_is_deterministic_held_out_and_shared_with_the_parts(docs) -> None:
    mix = load_corpus("smol-mix")
    assert load_corpus("smol-mix").fingerprint == mix.fingerprint
    assert not set(mix.train) & set(mix.val)  # whole documents, never one cut in two
    val_chars = sum(map(len, mix.val))
    assert 0.09 < val_chars / (val_chars + sum(map(len, mix.train))) < 0.13
    train, val = [], []
    for part in sm.PARTS:
        one = load_corpus(f"smol-mix:{part}")
        assert one.train and one.val and not set(one.train) & set(one.val)
        share = sum(map(len, one.val)) / sum(map(len, one.val + one.train))
        assert 0.08 < share < 0.2, (part, share)
        train += one.train
        val += one.val
    assert sorted(train) == sorted(mix.train) and sorted(val) == sorted(mix.val)
    two = load_corpus("smol-mix:code+math")
    assert sorted(two.val) == sorted(load_corpus("smol-mix:math").val
                                     + load_corpus("smol-mix:code").val)
    # the input's order does not matter, and the mix interleaves its parts (never in blocks)
    reordered = sm.split(list(reversed(docs["math"])), 0.1)
    assert sorted(reordered[1]) == sorted(sm.split(docs["math"], 0.1)[1])
    part_of = {text: part for part in sm.PARTS for _, text in docs[part]}
    for split in (mix.train, mix.val):
        labels = [part_of[text] for text in split]
        assert sum(a != b for a, b in zip(labels, labels[1:], strict=False)) > len(labels) / 8


def test_later_loads_read_the_cache(docs, monkeypatch: pytest.MonkeyPatch) -> None:
    def rebuild() -> None:
        raise AssertionError("smol-mix was built again instead of read from its cache")

    monkeypatch.setattr(sm, "build", rebuild)
    assert sm.documents(cache_dir() / "corpora") == docs
    assert load_corpus("smol-mix:prose").val


def test_unknown_parts_are_refused() -> None:
    for name in ("smol-mix:web", "smol-mix:", "smol-mix:code+poems"):
        with pytest.raises(UserError, match="parts: prose, code, math"):
            load_corpus(name)
