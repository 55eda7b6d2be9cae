"""Training text: load documents, tokenise, pack into sequences, split, partition over devices.

Sources (nothing is downloaded):
- `stdlib`: the Python standard library's own .py sources, present on every machine; each file's
  domain is its top-level module or package (`json/decoder.py` -> `json`). Tests are left out.
- `jsonl`: one JSON object per line with a text field and an optional domain field.
- `text_dir`: every .txt file under a directory; the domain is its first-level subdirectory.

The validation split is by document, so no validation text was seen in training. Training
sequences are packed within a domain, so each sequence has one domain label, which the
Dirichlet partition uses to give devices skewed (non-IID) domain mixes.
"""

from __future__ import annotations

import json
import sysconfig
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from echelon.config import DataConfig, PartitionConfig
from echelon.errors import UserError

_STDLIB_SKIP = {"site-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclass(frozen=True)
class Document:
    text: str
    domain: str


@dataclass(frozen=True)
class Corpus:
    """Packed token sequences. `train_domain[i]` indexes `domains`."""

    train: np.ndarray  # int32 [N, seq_len]
    train_domain: np.ndarray  # int64 [N]
    val: np.ndarray  # int32 [M, seq_len]
    domains: list[str]

    @property
    def seq_len(self) -> int:
        return int(self.train.shape[1])


def stdlib_documents() -> list[Document]:
    """The standard library's .py sources, labelled by top-level module or package, path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _STDLIB_SKIP.intersection(rel.parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few files are deliberately not UTF-8 (encoding test fixtures)
        if text.strip():
            docs.append(Document(text, rel.parts[0].removesuffix(".py")))
    return docs


def row_document(row: object, text_field: str, domain_field: str | None, where: str) -> Document:
    """The document in one record (a mapping); UserError naming `where` and the field when the
    text is missing or not a string. A record without the domain field is in domain `default`."""
    if not isinstance(row, Mapping) or not isinstance(row.get(text_field), str):
        raise UserError(
            f"{where}: field {text_field!r} is missing or not a string "
            f"(set data.text_field to the name of the text field)"
        )
    domain = row.get(domain_field, "default") if domain_field else "default"
    return Document(row[text_field], str(domain))


def jsonl_documents(path: Path, text_field: str, domain_field: str | None) -> list[Document]:
    """Documents from a JSONL file; a bad line is a UserError naming the file, line and field."""
    if not path.is_file():
        raise UserError(f"data.path: {path} is not a file")
    docs = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            docs.append(row_document(row, text_field, domain_field, f"{path}:{lineno}"))
    return docs


def hf_dataset_documents(path: Path, text_field: str, domain_field: str | None) -> list[Document]:
    """Documents from a Hugging Face `datasets` dataset on local disk: a directory written by
    `Dataset.save_to_disk` (its `train` split, for a DatasetDict), or a .jsonl/.json/.parquet file."""
    try:
        import datasets
    except ImportError:
        raise UserError(
            "data.source hf_dataset needs the datasets package: pip install 'echelon[datasets]'"
        ) from None
    builders = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
        elif path.suffix in builders:
            ds = datasets.load_dataset(builders[path.suffix], data_files=str(path), split="train")
        else:
            raise UserError(
                f"data.path: {path} is neither a saved dataset directory nor a .jsonl, .json or .parquet file"
            )
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetGenerationError) as e:
        raise UserError(f"data.path: cannot load {path} as a dataset: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise UserError(f"data.path: {path} has splits {', '.join(ds)}, no `train` split")
        ds = ds["train"]
    return [row_document(row, text_field, domain_field, f"{path} row {i}") for i, row in enumerate(ds)]


def text_dir_documents(path: Path) -> list[Document]:
    """Documents from the .txt files under `path`; the domain is the first-level subdirectory."""
    if not path.is_dir():
        raise UserError(f"data.path: {path} is not a directory")
    docs = []
    for p in sorted(path.rglob("*.txt")):
        rel = p.relative_to(path)
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{p}: not UTF-8 text") from None
        docs.append(Document(text, rel.parts[0] if len(rel.parts) > 1 else "default"))
    return docs


def load_documents(cfg: DataConfig, seed: int, given: list[Document] | None = None) -> list[Document]:
    """The configured documents (or those `given` instead of the configured source), subsampled to
    `max_documents` deterministically from `seed`."""
    if given is not None:
        docs = list(given)
    elif cfg.source == "stdlib":
        docs = stdlib_documents()
    elif cfg.source == "jsonl":
        docs = jsonl_documents(cfg.path, cfg.text_field, cfg.domain_field)
    elif cfg.source == "hf_dataset":
        docs = hf_dataset_documents(cfg.path, cfg.text_field, cfg.domain_field)
    else:
        docs = text_dir_documents(cfg.path)
    docs = [d for d in docs if d.text.strip()]
    if cfg.max_documents is not None and len(docs) > cfg.max_documents:
        keep = np.sort(np.random.default_rng(seed).choice(len(docs), cfg.max_documents, replace=False))
        docs = [docs[i] for i in keep]
    if len(docs) < 2:
        raise UserError(
            f"data: found {len(docs)} non-empty documents; need at least 2 (train and validation)"
        )
    return docs


def _pack(token_arrays: list[np.ndarray], eos: int, seq_len: int) -> np.ndarray:
    """Concatenate documents (each followed by eos) and cut into full sequences of seq_len."""
    if not token_arrays:
        return np.zeros((0, seq_len), dtype=np.int32)
    sep = np.array([eos], dtype=np.int32)
    flat = np.concatenate([piece for t in token_arrays for piece in (t, sep)])
    n = flat.size // seq_len
    return flat[: n * seq_len].reshape(n, seq_len)


def tokenize(texts: list[str], tokenizer, chunk: int = 8) -> list[np.ndarray]:
    """Token ids of each text as int32 arrays, encoded a chunk at a time to bound peak memory."""
    out = []
    for i in range(0, len(texts), chunk):
        # split_special_tokens: a literal "</s>" in the text is text, not a token.
        ids = tokenizer(
            texts[i : i + chunk],
            add_special_tokens=False,
            split_special_tokens=True,
            return_attention_mask=False,
        )["input_ids"]
        out += [np.asarray(t, dtype=np.int32) for t in ids]
    return out


def build_corpus(docs: list[Document], tokenizer, cfg: DataConfig, seed: int) -> Corpus:
    """Tokenise, split by document (validation = `val_fraction` of documents), pack per domain."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(docs))
    n_val = max(1, round(cfg.val_fraction * len(docs)))
    val_ids, train_ids = set(order[:n_val].tolist()), order[n_val:]
    encoded = tokenize([d.text for d in docs], tokenizer)
    eos = tokenizer.eos_token_id
    domains = sorted({docs[i].domain for i in train_ids})
    train_parts, train_domain = [], []
    for k, name in enumerate(domains):
        packed = _pack([encoded[i] for i in sorted(train_ids) if docs[i].domain == name], eos, cfg.seq_len)
        train_parts.append(packed)
        train_domain.append(np.full(len(packed), k, dtype=np.int64))
    val = _pack([encoded[i] for i in sorted(val_ids)], eos, cfg.seq_len)
    train = np.concatenate(train_parts)
    if len(train) == 0 or len(val) == 0:
        raise UserError(
            f"data: too little text for seq_len {cfg.seq_len}: {len(train)} training and {len(val)} "
            "validation sequences (add documents or lower data.seq_len)"
        )
    return Corpus(train, np.concatenate(train_domain), val, domains)


def partition(
    domain_of: np.ndarray, n_devices: int, cfg: PartitionConfig, seed: int, min_size: int = 1
) -> list[np.ndarray]:
    """Indices of the sequences each device holds.

    iid: a random equal split. dirichlet: for each domain, proportions p ~ Dir(alpha * 1) over
    devices, so a small alpha concentrates each domain on few devices (severe non-IID). Draws are
    repeated (seeded) until every device holds at least `min_size` sequences.
    """
    rng = np.random.default_rng(seed)
    n = len(domain_of)
    if n < n_devices * min_size:
        raise UserError(
            f"data: {n} training sequences cannot give {n_devices} devices {min_size} each "
            "(add documents, lower data.seq_len or train.micro_batch)"
        )
    if cfg.kind == "iid":
        return [np.sort(p) for p in np.array_split(rng.permutation(n), n_devices)]
    for _ in range(100):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_devices)]
        for d in np.unique(domain_of):
            idx = rng.permutation(np.flatnonzero(domain_of == d))
            cuts = (np.cumsum(rng.dirichlet(np.full(n_devices, cfg.alpha))) * len(idx)).astype(np.int64)[:-1]
            for dev, chunk in enumerate(np.split(idx, cuts)):
                parts[dev].append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    raise UserError(
        f"data.partition.alpha: {cfg.alpha} leaves some device with fewer than {min_size} sequences "
        "in 100 draws; raise alpha or add data"
    )


def partition_skew(domain_of: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each device's domain mix and the overall mix (0 = IID)."""
    k = int(domain_of.max()) + 1
    overall = np.bincount(domain_of, minlength=k) / len(domain_of)
    tv = [0.5 * np.abs(np.bincount(domain_of[p], minlength=k) / len(p) - overall).sum() for p in parts]
    return float(np.mean(tv))
