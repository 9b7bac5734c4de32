"""Corpora split deterministically by document, and their token streams.

Every corpus is a list of documents with stable ids. A document's split is decided by a hash
of its id alone, so the assignment does not depend on the machine, the file-system order or
the other documents: adding a file never moves another one between splits, and the splits
are disjoint by document (the probes' held-out numbers rely on that).
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import sysconfig
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nnobs.core.errors import NnobsError, first_line

SPLITS = ("train", "validation", "test")

# Extensions read from a directory corpus. A whitelist rather than sniffing content: it is
# predictable, and it keeps lock files, data dumps and binaries out of a code corpus.
TEXT_EXTENSIONS = frozenset(
    {".py", ".txt", ".md", ".rst", ".json", ".c", ".h", ".js", ".ts", ".java", ".go", ".rs"}
    | {".toml", ".yaml", ".yml", ".html", ".css", ".sh"}
)
# A single text file is cut into documents of this many lines so it can still be split.
LINES_PER_CHUNK = 200
# Directories never read from a directory corpus (version control, environments, caches).
_SKIP_DIRS = frozenset({"__pycache__", "node_modules", "site-packages"})
# Stdlib directories that hold test suites; none of them belong to the "stdlib" domain.
_STDLIB_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
# Data files that a spec like "hf:data.jsonl" loads through `datasets`, by builder.
_DATA_FILE_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".txt": "text",
}
_HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")
# A dataset named on the Hugging Face Hub is loaded from the Hub if it answers within this many
# seconds, else from the local cache, failing at once if it is not there; with the environment
# variable set (to anything), datasets is left to retry an unreachable Hub for itself.
HUB_PROBE_TIMEOUT_S = 5.0
HUB_RETRIES_ENV = "NNOBS_HUB_RETRIES"


@dataclass(frozen=True)
class Document:
    id: str  # stable across machines: a relative path, "<file>#<chunk>" or "hf:<name>/<row>"
    text: str


def docs_fingerprint(docs: Iterable[Document]) -> str:
    """Short sha256 over the ids and texts, in order; it changes iff the content changes."""
    h = hashlib.sha256()
    for doc in docs:
        id_b, text_b = doc.id.encode("utf-8"), doc.text.encode("utf-8", "surrogatepass")
        # Length prefixes make the byte stream unambiguous (no two lists hash alike by
        # shifting characters between an id and a text).
        h.update(f"{len(id_b)}:{len(text_b)}:".encode())
        h.update(id_b)
        h.update(text_b)
    return h.hexdigest()[:16]


@dataclass
class Corpus:
    name: str  # the spec it was loaded from: "stdlib", "stdlib-tests", a path, "hf:<dataset>"
    source: dict  # provenance: kind, path or dataset, python version, n_files, n_chars, ...
    train: list[Document]
    validation: list[Document]
    test: list[Document]

    def split(self, name: str) -> list[Document]:
        if name not in SPLITS:
            raise NnobsError(f"unknown split {name!r}: use one of {', '.join(SPLITS)}")
        return getattr(self, name)

    @property
    def fingerprint(self) -> str:
        """Short hex over every split's ids and texts; moving a document changes it too."""
        parts = [f"{name}={docs_fingerprint(self.split(name))}" for name in SPLITS]
        return hashlib.sha256(";".join(parts).encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    """``$NNOBS_CACHE`` or ``~/.cache/nnobs``: where tokenizers and token arrays are kept."""
    env = os.environ.get("NNOBS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "nnobs"


def load_corpus(
    spec: str = "stdlib",
    *,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    max_chars: int | None = None,
    text_column: str | None = None,
) -> Corpus:
    """Load a corpus and split it by document into train / validation / test.

    ``spec`` is one of:

    - ``"stdlib"``: the ``.py`` files of the running interpreter's standard library, without
      its test suites (the ``test`` package and every ``test``/``tests``/``idle_test``
      directory) and without ``site-packages``. On CPython 3.11 that is ~730 files and
      ~12 M characters.
    - ``"stdlib-tests"``: only the ``test`` package (~800 files, ~17 M characters on 3.11),
      a second domain of the same language.
    - a path to a directory: every file under it whose extension is in ``TEXT_EXTENSIONS``,
      one document per file (hidden entries, ``__pycache__``, ``node_modules`` and
      ``site-packages`` are skipped). A directory written by ``Dataset.save_to_disk`` is
      loaded as a dataset instead.
    - a path to a file: one text file cut into documents of ``LINES_PER_CHUNK`` lines;
      ``.jsonl`` and ``.parquet`` files are loaded as dataset rows instead.
    - ``"hf:<name>[:<config>][@<split>]"``, or a bare ``owner/name`` that is not a local
      path: a Hugging Face dataset (one document per row of the chosen split, default
      ``train``); ``<name>`` may also be a local data file or dataset directory. The text
      column is ``text_column``, else the first of "text", "content", "code", else the
      first string column. A dataset named on the Hub is read from the local cache when the
      Hub does not answer within ``HUB_PROBE_TIMEOUT_S`` (see ``HUB_RETRIES_ENV``).

    Files are read as UTF-8 (undecodable bytes replaced); empty documents are dropped.
    Within a split, documents are ordered by the hash of their id: a fixed pseudo-random
    order, so any prefix is an unbiased sample and a training stream mixes sources.
    ``max_chars`` caps each split at its fraction of the total (for quick runs): documents
    are taken in split order and the one crossing the cap is cut short.
    """
    fractions = _check_fractions(fractions)
    if max_chars is not None and max_chars <= 0:
        raise NnobsError(f"max_chars must be a positive number of characters, got {max_chars}")
    docs, source = _read_spec(spec, text_column)
    if not docs:
        raise NnobsError(f"corpus {spec!r} is empty: every document in it is empty")
    splits = _assign_splits(docs, fractions)
    if max_chars is not None:
        splits = [
            _cap(split, max(1, int(max_chars * f)))
            for split, f in zip(splits, fractions, strict=True)
        ]
    source = {
        **source,
        "n_documents": sum(len(s) for s in splits),
        "n_chars": sum(len(d.text) for s in splits for d in s),
        "fractions": list(fractions),
        "max_chars": max_chars,
    }
    return Corpus(spec, source, *splits)


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(f) for f in fractions)
    if len(values) != 3 or min(values) <= 0 or abs(sum(values) - 1.0) > 1e-6:
        raise NnobsError(
            f"split fractions {list(fractions)} are invalid: give three positive numbers "
            "(train, validation, test) that sum to 1"
        )
    return values  # type: ignore[return-value]


def _unit(doc_id: str) -> float:
    """The document id hashed to a uniform number in [0, 1)."""
    digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _assign_splits(
    docs: list[Document], fractions: tuple[float, float, float]
) -> list[list[Document]]:
    if len(docs) < 3:
        raise NnobsError(
            f"the corpus has {len(docs)} non-empty document(s); at least 3 are needed for "
            "train/validation/test splits by document"
        )
    ranked = sorted(docs, key=lambda d: (_unit(d.id), d.id))
    bounds = np.cumsum(fractions)
    splits: list[list[Document]] = [[], [], []]
    for doc in ranked:
        index = min(int(np.searchsorted(bounds, _unit(doc.id), side="right")), 2)
        splits[index].append(doc)
    if all(splits):
        return splits
    # Too few documents for the hashes to reach every split: cut the hash order into
    # consecutive runs instead, every split at least one document.
    n = len(ranked)
    n_test = min(max(1, round(fractions[2] * n)), n - 2)
    n_val = min(max(1, round(fractions[1] * n)), n - 1 - n_test)
    n_train = n - n_val - n_test
    return [ranked[:n_train], ranked[n_train : n_train + n_val], ranked[n_train + n_val :]]


def _cap(docs: list[Document], budget: int) -> list[Document]:
    kept: list[Document] = []
    total = 0
    for doc in docs:
        if total >= budget:
            break
        room = budget - total
        kept.append(doc if len(doc.text) <= room else Document(doc.id, doc.text[:room]))
        total += len(kept[-1].text)
    return kept


# ---------------------------------------------------------------------------- sources


def _read_spec(spec: str, text_column: str | None) -> tuple[list[Document], dict[str, Any]]:
    if spec in ("stdlib", "stdlib-tests"):
        return _read_stdlib(tests=spec == "stdlib-tests")
    if spec.startswith("hf:"):
        return _read_hf(spec[3:], text_column)
    path = Path(spec).expanduser()
    if path.exists():
        if _is_saved_dataset(path) or (path.is_file() and path.suffix in (".jsonl", ".parquet")):
            return _read_hf(str(path), text_column)
        return _read_path(path)
    if _HUB_NAME.match(spec.split("@")[0].split(":")[0]):
        return _read_hf(spec, text_column)
    raise NnobsError(
        f"corpus {spec!r} not found: use 'stdlib', 'stdlib-tests', an existing file or "
        "directory, or 'hf:<dataset>'"
    )


def _read_files(root: Path, files: Iterable[Path]) -> list[Document]:
    docs = []
    for file in sorted(files, key=lambda f: f.relative_to(root).as_posix()):
        text = file.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            docs.append(Document(file.relative_to(root).as_posix(), text))
    return docs


def _walk(
    root: Path, keep_dir: Callable[[Path], bool], keep_file: Callable[[Path], bool]
) -> list[Path]:
    """Files under ``root`` (symlinked directories not followed) that pass both filters."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if keep_dir(here / d)]
        found.extend(here / f for f in filenames if keep_file(here / f))
    return found


def _read_stdlib(tests: bool) -> tuple[list[Document], dict[str, Any]]:
    root = Path(sysconfig.get_paths()["stdlib"])

    def keep_dir(d: Path) -> bool:
        rel = d.relative_to(root).parts
        if tests:
            return rel[0] == "test" and d.name != "__pycache__"
        return d.name not in _STDLIB_TEST_DIRS and d.name not in _SKIP_DIRS

    def keep_file(f: Path) -> bool:
        top_level = f.parent == root
        return f.suffix == ".py" and not (tests and top_level)

    docs = _read_files(root, _walk(root, keep_dir, keep_file))
    source = {
        "kind": "stdlib-tests" if tests else "stdlib",
        "path": str(root),
        "python_version": sys.version.split()[0],
        "implementation": sys.implementation.name,
        "n_files": len(docs),
    }
    return docs, source


def _read_path(path: Path) -> tuple[list[Document], dict[str, Any]]:
    if path.is_file():
        text = path.read_text(encoding="utf-8", errors="replace")
        lines = text.splitlines(keepends=True)
        docs = []
        for k, start in enumerate(range(0, len(lines), LINES_PER_CHUNK)):
            chunk = "".join(lines[start : start + LINES_PER_CHUNK])
            if chunk.strip():
                docs.append(Document(f"{path.name}#{k}", chunk))
        return docs, {"kind": "file", "path": str(path.resolve()), "n_files": 1}

    def keep_dir(d: Path) -> bool:
        return not d.name.startswith(".") and d.name not in _SKIP_DIRS

    def keep_file(f: Path) -> bool:
        return not f.name.startswith(".") and f.suffix.lower() in TEXT_EXTENSIONS

    files = _walk(path, keep_dir, keep_file)
    if not files:
        raise NnobsError(
            f"directory {str(path)!r} has no text files (looked for "
            f"{' '.join(sorted(TEXT_EXTENSIONS))}): point at a directory of source or text"
        )
    docs = _read_files(path, files)
    return docs, {"kind": "directory", "path": str(path.resolve()), "n_files": len(files)}


def _is_saved_dataset(path: Path) -> bool:
    """A directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return path.is_dir() and (
        (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()
    )


@contextmanager
def _hub_or_cache(name: str) -> Iterator[bool]:
    """Load a dataset by name from the Hub when it answers within ``HUB_PROBE_TIMEOUT_S``,
    else from the local cache only (offline mode inside the block): without network, datasets
    would retry for half a minute before failing. Yields whether the Hub is used."""
    import datasets
    import huggingface_hub.constants as hub

    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    if hub.HF_HUB_OFFLINE or os.environ.get(HUB_RETRIES_ENV) or _hub_answers(name):
        yield not hub.HF_HUB_OFFLINE
        return
    saved = hub.HF_HUB_OFFLINE, *(getattr(datasets.config, n) for n in names)
    hub.HF_HUB_OFFLINE = True
    for n in names:
        setattr(datasets.config, n, True)
    try:
        yield False
    finally:
        hub.HF_HUB_OFFLINE = saved[0]
        for n, value in zip(names, saved[1:], strict=True):
            setattr(datasets.config, n, value)


def _hub_answers(name: str) -> bool:
    """Whether the Hugging Face Hub answers a question about dataset ``name`` in time."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        HfApi().dataset_info(name, timeout=HUB_PROBE_TIMEOUT_S)
    except HfHubHTTPError:
        return True  # it answered (no such dataset, gated, private): load_dataset says which
    except Exception:  # the hub client raises many types for "no network"
        return False
    return True


def _read_hf(spec: str, text_column: str | None) -> tuple[list[Document], dict[str, Any]]:
    try:
        import datasets
    except ImportError as e:
        raise NnobsError(
            "loading a Hugging Face dataset needs the 'datasets' package: pip install 'nnobs[hf]'"
        ) from e
    name, at, split = spec.rpartition("@")
    if not at:
        name, split = spec, None
    path = Path(name).expanduser()
    online = True
    try:
        if _is_saved_dataset(path):
            source = {"kind": "hf-disk", "path": str(path.resolve())}
            data = datasets.load_from_disk(str(path))
        elif path.is_file():
            builder = _DATA_FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise NnobsError(
                    f"cannot load {str(path)!r} as a dataset: use a file ending in "
                    f"{' '.join(sorted(_DATA_FILE_BUILDERS))}"
                )
            source = {"kind": "hf-files", "path": str(path.resolve()), "builder": builder}
            data = datasets.load_dataset(builder, data_files=str(path))
        elif path.is_dir():
            source = {"kind": "hf-files", "path": str(path.resolve())}
            data = datasets.load_dataset(str(path))
        else:
            name, _, config = name.partition(":")
            source = {"kind": "hf", "dataset": name, "config": config or None}
            with _hub_or_cache(name) as online:
                data = datasets.load_dataset(name, config or None)
    except NnobsError:
        raise
    except Exception as e:  # datasets and the hub client raise many types for "unavailable"
        if not path.exists() and not online:
            raise NnobsError(
                f"dataset {name!r} is not in the local Hugging Face cache and the Hub cannot "
                "be reached: without network access use a local data file or a directory "
                f"written by save_to_disk (or set {HUB_RETRIES_ENV}=1 to wait for the network)"
            ) from e
        hint = (
            "the file or directory is not a readable dataset"
            if path.exists()
            else "it is not a local path either; without network access use a local data "
            "file or a directory written by save_to_disk"
        )
        raise NnobsError(f"cannot load dataset {name!r} ({first_line(e)}): {hint}") from e
    rows = _pick_split(data, split, spec)
    column = _text_column(rows, text_column, spec)
    label = path.name if path.exists() else name
    docs = [
        Document(f"hf:{label}/{i}", text)
        for i, text in enumerate(rows[column])
        if isinstance(text, str) and text.strip()
    ]
    version = rows.info.version
    source.update(
        split=str(rows.split) if rows.split is not None else split,
        version=str(version) if version is not None else None,
        text_column=column,
        n_rows=len(rows),
    )
    return docs, source


def _pick_split(data: Any, split: str | None, spec: str) -> Any:
    """The one dataset split to draw documents from (nnobs re-splits it by document)."""
    if not hasattr(data, "keys"):  # a single Dataset
        return data
    available = list(data.keys())
    if split is None:
        split = "train" if "train" in available or len(available) != 1 else available[0]
    if split not in available:
        raise NnobsError(
            f"dataset {spec!r} has no split {split!r}: choose one of {', '.join(available)} "
            "with '@<split>'"
        )
    return data[split]


def _text_column(rows: Any, wanted: str | None, spec: str) -> str:
    columns = list(rows.column_names)
    if wanted is not None:
        if wanted not in columns:
            raise NnobsError(
                f"dataset {spec!r} has no column {wanted!r}: its columns are {', '.join(columns)}"
            )
        return wanted
    for candidate in ("text", "content", "code"):
        if candidate in columns:
            return candidate
    for column, feature in rows.features.items():
        if getattr(feature, "dtype", None) in ("string", "large_string"):
            return column
    raise NnobsError(
        f"dataset {spec!r} has no text column (columns: {', '.join(columns)}): "
        "name one with text_column"
    )


# ---------------------------------------------------------------------------- tokens


def corpus_info(corpus: Corpus) -> dict:
    return {"name": corpus.name, "fingerprint": corpus.fingerprint, "source": corpus.source}
