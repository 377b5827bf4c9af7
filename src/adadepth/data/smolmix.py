"""`smol-mix`: held-out in-domain text for SmolLM2, built offline from what every install has.

SmolLM2 was pretrained on educational web prose (FineWeb-Edu, DCLM), code (The Stack,
StarCoderData, Stack-Edu) and math (FineMath, OpenWebMath, InfiMM-WebMath). None of those ship
in a package, so this corpus takes the nearest text that the project's own dependencies install
(see docs/corpora.md for the choice and its limits), in three parts:

- `prose`: English technical prose. The Python Language Reference as the interpreter ships it
  (`pydoc_data.topics`, with the text that one topic repeats from another removed), and the
  narrative docstrings (no math, no doctest, 500 characters or more) of numpy, networkx, sympy,
  mpmath and of the standard library modules that `code` does not take.
- `code`: Python source files of the standard library, as whole files (comments and docstrings
  kept, as in The Stack).
- `math`: the docstrings of numpy, networkx, sympy and mpmath that hold LaTeX math (definitions,
  identities and derivations, with their worked examples).

numpy is a direct dependency, torch brings sympy, mpmath and networkx; the standard library
comes with Python. Each part takes documents up to a fixed share of `TOTAL_CHARS`, and each
part's validation split is whole documents (about `val_fraction` of its characters), chosen by a
hash of the document's name: deterministic, disjoint from training, and the same documents in
`smol-mix` as in `smol-mix:PART`. The mix's documents are interleaved (by the same kind of hash)
so that the first windows of its validation stream already hold every part.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import re
import sys
import sysconfig
from pathlib import Path

from adadepth.errors import UserError

NAME = "smol-mix"
FORMAT = 1  # bump when the documents change, so that caches built before are not reused
# Shares of the characters, near SmolLM2's pretraining mix (web ~75%, code ~20%, math ~5% over
# its stages, math rising to ~14% in the last ones), with math raised so that its part has
# enough held-out text to measure.
PARTS = {"prose": 0.60, "code": 0.25, "math": 0.15}
TOTAL_CHARS = 3_000_000
PACKAGES = ("numpy", "networkx", "sympy", "mpmath")  # docstring sources, prose and math

MIN_PROSE_DOC = 500  # a docstring shorter than this is a signature note, not prose
MIN_TOPIC = 300  # a reference topic left shorter than this after de-duplication is dropped
MAX_CHUNK = 12_000  # one module's docstrings are cut into documents of about this many chars
MIN_CODE, MAX_CODE = 1_000, 32_000  # stdlib files: skip stubs and the few very long files
# Not in every Python's standard library (Debian splits them off), or not code a person wrote.
STDLIB_SKIP = frozenset({
    "test", "tests", "idle_test", "site-packages", "dist-packages", "idlelib", "lib2to3",
    "tkinter", "turtledemo", "distutils", "ensurepip", "venv", "pydoc_data", "encodings",
    "__pycache__",
})
_MATH = re.compile(r"\.\. math::|:math:`|\$[^$\n]*\\[a-zA-Z]+[^$\n]*\$|\\frac\{|\\sum_|\\int_")


def parse_parts(spec: str | None) -> list[str]:
    """The parts of `smol-mix[:PART[+PART...]]`, in the order of `PARTS`."""
    if spec is None:
        return list(PARTS)
    wanted = [p for p in spec.split("+") if p]
    unknown = [p for p in wanted if p not in PARTS]
    if unknown or not wanted:
        raise UserError(f"unknown part {unknown[0] if unknown else spec!r} in {NAME}:{spec}; "
                        f"parts: {', '.join(PARTS)} (join with +)")
    return [p for p in PARTS if p in wanted]


def load(parts: list[str], val_fraction: float, cache: Path) -> tuple[list[str], list[str]]:
    """Train and validation documents of the chosen parts (built once, then read from `cache`)."""
    docs = documents(cache)
    train: list[tuple[str, str]] = []
    val: list[tuple[str, str]] = []
    for part in parts:
        t, v = split(docs[part], val_fraction)
        train += t
        val += v
    if len(parts) > 1:  # interleave the parts, so any prefix of a split holds all of them
        train.sort(key=lambda d: _rank(d[0], "mix"))
        val.sort(key=lambda d: _rank(d[0], "mix"))
    return [text for _, text in train], [text for _, text in val]


def split(docs: list[tuple[str, str]], val_fraction: float
          ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Whole documents, in the order of a hash of their names, go to validation until it holds
    `val_fraction` of the characters; the rest, in their own order, to training."""
    order = sorted(range(len(docs)), key=lambda i: _rank(docs[i][0], "val"))
    target = val_fraction * sum(len(text) for _, text in docs)
    chosen: set[int] = set()
    held = 0
    for i in order:
        if held >= target or len(chosen) == len(docs) - 1:
            break
        chosen.add(i)
        held += len(docs[i][1])
    return ([d for i, d in enumerate(docs) if i not in chosen],
            [d for i, d in enumerate(docs) if i in chosen])


def documents(cache: Path) -> dict[str, list[tuple[str, str]]]:
    """Every part's (name, text) documents, read from the cache or built and cached."""
    versions = source_versions()
    key = hashlib.sha256(json.dumps([FORMAT, PARTS, TOTAL_CHARS, versions]).encode())
    kept = cache / f"{NAME}-{key.hexdigest()[:16]}.json"
    if kept.is_file():
        try:
            stored = json.loads(kept.read_text(encoding="utf-8"))
            return {part: [(n, t) for n, t in stored["parts"][part]] for part in PARTS}
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged cache: build it again
    built = build()
    from adadepth.data.corpora import _write_lines_atomic

    _write_lines_atomic(kept, [json.dumps({"versions": versions, "parts": built})])
    return built


def source_versions() -> dict[str, str]:
    """What the text comes from: the Python that runs, and the packages' versions."""
    found = {"python": ".".join(map(str, sys.version_info[:3]))}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            raise UserError(f"the {NAME} corpus needs the {name} package, which adadepth's "
                            "dependencies install (numpy directly; torch brings sympy, mpmath "
                            "and networkx): reinstall adadepth") from None
    return found


def build() -> dict[str, list[tuple[str, str]]]:
    """The documents of every part, each part cut to its share of `TOTAL_CHARS`."""
    budget = {part: int(share * TOTAL_CHARS) for part, share in PARTS.items()}
    stdlib = _stdlib_modules()
    code = _take([(f"code:python-stdlib/{rel}", text) for rel, text in stdlib.items()
                  if MIN_CODE <= len(text) <= MAX_CODE], budget["code"])
    in_code = {name.split("/", 1)[1] for name, _ in code}
    # the standard library's narrative docstrings, from the modules that code did not take
    prose_docs = [doc for rel, text in stdlib.items() if rel not in in_code
                  for doc in _chunks(f"prose:python-stdlib/{rel}", _sorted_docstrings(text)[1])]
    math_docs: list[tuple[str, str]] = []
    for package in PACKAGES:
        prose, maths = _package_docstrings(package)
        prose_docs += prose
        math_docs += maths
    topics = _reference_topics()
    return {
        # the reference topics first, all of them: they are the most web-like prose here
        "prose": topics + _take(prose_docs, budget["prose"] - sum(len(t) for _, t in topics)),
        "code": code,
        "math": _take(math_docs, budget["math"]),
    }


def _take(docs: list[tuple[str, str]], chars: int) -> list[tuple[str, str]]:
    """Documents in the order of a hash of their names until `chars` characters are taken."""
    taken, total = [], 0
    for doc in sorted(docs, key=lambda d: _rank(d[0], "take")):
        if total >= chars:
            break
        taken.append(doc)
        total += len(doc[1])
    return sorted(taken)


def _rank(name: str, salt: str) -> str:
    return hashlib.sha256(f"{salt}|{name}".encode()).hexdigest()


def _reference_topics() -> list[tuple[str, str]]:
    """The Language Reference topics that `help()` shows, each paragraph kept once: topics
    repeat one another (`compound` holds `while`, `if`, `try`, ...), so the longest topics keep
    their paragraphs and a shorter topic keeps only what no longer one said."""
    from pydoc_data.topics import topics

    seen: set[str] = set()
    kept = []
    for name in sorted(topics, key=lambda t: (-len(topics[t]), t)):
        fresh = []
        for paragraph in re.split(r"\n[ \t]*\n", topics[name].strip()):
            norm = " ".join(paragraph.split())
            if norm and norm not in seen:
                seen.add(norm)
                fresh.append(paragraph.rstrip())
        text = "\n\n".join(fresh) + "\n"
        if len(text) >= MIN_TOPIC:
            kept.append((f"prose:python-reference/{name}", text))
    return sorted(kept)


def _package_root(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the {NAME} corpus needs the {name} package: reinstall adadepth")
    return Path(next(iter(spec.submodule_search_locations)))


def _package_docstrings(package: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """A package's docstrings outside its tests, as prose and math documents (see
    `_sorted_docstrings`), each module's cut into documents of about `MAX_CHUNK` characters."""
    root = _package_root(package)
    seen: set[str] = set()  # a docstring met twice (an alias, a shared template) is kept once
    prose: list[tuple[str, str]] = []
    maths: list[tuple[str, str]] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in ("tests", "test", "testing") for part in rel.parts):
            continue
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        math_texts, prose_texts = _sorted_docstrings(source, seen)
        where = f"{package}/{rel.as_posix()}"
        maths += _chunks(f"math:{where}", math_texts)
        prose += _chunks(f"prose:{where}", prose_texts)
    return prose, maths


def _sorted_docstrings(source: str, seen: set[str] | None = None) -> tuple[list[str], list[str]]:
    """A module's docstrings with LaTeX math, and its long narrative ones (no math, no
    doctest, at least `MIN_PROSE_DOC` characters); the others are left out."""
    seen = set() if seen is None else seen
    maths, prose = [], []
    for text in _docstrings(source):
        if text in seen:
            continue
        seen.add(text)
        if _MATH.search(text):
            maths.append(text)
        elif len(text) >= MIN_PROSE_DOC and ">>>" not in text:
            prose.append(text)
    return maths, prose


def _docstrings(source: str) -> list[str]:
    """The docstrings of a module, its classes and functions, in source order (the long string
    constants that some modules keep their documentation in count as docstrings)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            text = ast.get_docstring(node, clean=True)
        elif (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
              and isinstance(node.value.value, str) and len(node.value.value) >= MIN_PROSE_DOC
              and "\n" in node.value.value):
            text = inspect.cleandoc(node.value.value)  # mpmath keeps its docs in constants
        else:
            continue
        if text and text.strip():
            found.append((getattr(node, "lineno", 0), text.strip() + "\n"))
    return [text for _, text in sorted(found, key=lambda f: f[0])]


def _chunks(name: str, texts: list[str]) -> list[tuple[str, str]]:
    """Consecutive texts joined by blank lines into documents of about `MAX_CHUNK` chars."""
    docs: list[tuple[str, str]] = []
    current: list[str] = []
    size = 0
    for text in texts:
        if current and size + len(text) > MAX_CHUNK:
            docs.append((f"{name}#{len(docs)}", "\n".join(current)))
            current, size = [], 0
        current.append(text)
        size += len(text) + 1
    if current:
        docs.append((f"{name}#{len(docs)}", "\n".join(current)))
    return docs


def _stdlib_modules() -> dict[str, str]:
    """Source of the standard library modules that every CPython install has, by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(p in STDLIB_SKIP or p.startswith(("config-3", "_sysconfigdata")) for p in rel.parts):
            continue
        try:
            found[rel.as_posix()] = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
    if not found:
        raise UserError(f"no standard library source found under {root}")
    return found
