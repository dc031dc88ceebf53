"""Document sources for the long-context tasks, as lm-eval ``custom_dataset`` functions.

A task YAML names one of these with ``custom_dataset: !function
lm_eval_longshort.harness.datasets.<name>``. lm-eval calls it with the task's metadata merged with
the model arguments as keyword arguments, so each function takes ``**kwargs`` and ignores the keys
it does not use. Each returns ``DatasetDict({"test": ds})`` whose rows have at least a string
``text`` (the document) and a string ``title`` (its name), in a stable order.

All loading goes through the ``datasets`` library (its json, parquet and text builders for local
files, the hub for dataset ids), so formats are read the same way lm-eval itself reads them.
"""

from __future__ import annotations

import codecs
import glob
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import datasets

from lm_eval_longshort import assets

# Metadata keys each loader reads. A data key given to a task whose loader does not read it
# is an error (harness/task.py): `files` on a Shakespeare task would otherwise be ignored.
LOADER_KEYS = {
    "shakespeare": (),
    "local": ("files", "text_field", "title_field"),
    "hub_documents": ("hf_dataset", "hf_config", "split", "text_field", "title_field"),
}
DATASET_KEYS = ("hf_dataset", "hf_config", "split", "text_field", "title_field", "files")

# File extension -> datasets builder name, for local().
LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}

FILES_HINT = 'pass --metadata \'{"files": "path/*.txt"}\''


def shakespeare(**kwargs: Any) -> datasets.DatasetDict:
    """The 38 Shakespeare plays of the embedded corpus, sorted by their path in the package.

    Columns: ``title``, ``path``, ``text``. Needs ``lm-eval-longshort prepare`` to have run.
    """
    found = assets.locate()
    if found is None or not found.corpus_file.is_file():
        raise FileNotFoundError(
            f"The Shakespeare corpus is not prepared (expected {assets.cache_dir()}/"
            f"{assets.CORPUS_SUBDIR}/{assets.CORPUS_NAME}). Run `lm-eval-longshort prepare` first."
        )
    ds = datasets.load_dataset("json", data_files=str(found.corpus_file), split="train")
    return datasets.DatasetDict({"test": ds})


def hub_documents(
    hf_dataset: str | None = None,
    hf_config: str | None = None,
    split: str = "test",
    text_field: str = "text",
    title_field: str | None = None,
    **kwargs: Any,
) -> datasets.DatasetDict:
    """Documents from a hub dataset id (or a local folder/file that ``datasets`` can read).

    ``text_field`` becomes ``text``; ``title`` comes from ``title_field`` when given, else it
    is ``f"{hf_dataset}[{i}]"``. Used by the pg19, proof-pile and govreport tasks.
    """
    if not hf_dataset:
        raise ValueError(
            "hub_documents needs `hf_dataset` (a hub dataset id or a local folder); set it in the "
            'task YAML\'s metadata or pass --metadata \'{"hf_dataset": "emozilla/pg19-test"}\'.'
        )
    if not split:
        raise ValueError('hub_documents needs `split` (e.g. "test"); got an empty value.')
    ds = datasets.load_dataset(hf_dataset, hf_config, split=split)
    source = f"{hf_dataset} (config {hf_config!r}, split {split!r})"
    texts = _text_column(ds, text_field, source)
    if title_field:
        titles = [str(t) for t in _column(ds, title_field, source, "title_field")]
    else:
        titles = [f"{hf_dataset}[{i}]" for i in range(len(ds))]
    return datasets.DatasetDict({"test": _with_text_and_title(ds, texts, titles, keep_others=True)})


def local(
    files: str | Path | Iterable[str | Path] | None = None,
    text_field: str = "text",
    title_field: str | None = None,
    **kwargs: Any,
) -> datasets.DatasetDict:
    """Documents from local files: a path, a glob, or a list of them.

    ``.txt``: each whole file is one document titled with the file name. ``.jsonl``/``.json``
    and ``.parquet``: each row is one document, its text in ``text_field``; its title is
    ``title_field`` when given, else ``"<file name>[<row>]"``. Files keep the order given,
    each glob's matches sorted. Columns: ``title``, ``text``.
    """
    paths = resolve_files(files)
    parts = [_load_local_file(path, text_field, title_field) for path in paths]
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return datasets.DatasetDict({"test": ds})


def resolve_files(files: str | Path | Iterable[str | Path] | None) -> list[Path]:
    """Expand a path, a glob or a list of them into existing files (globs sorted, no repeats)."""
    patterns = [files] if isinstance(files, (str, Path)) else list(files or [])
    if not [p for p in patterns if str(p)]:
        raise ValueError(f"The `local` dataset needs files to read: {FILES_HINT}.")
    resolved: list[Path] = []
    for pattern in patterns:
        pattern = str(Path(pattern).expanduser())
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            matches = [m for m in matches if Path(m).is_file()]
            if not matches:
                raise FileNotFoundError(f"No file matches {pattern!r} (the `files` metadata key).")
        elif Path(pattern).is_dir():
            raise IsADirectoryError(
                f"{pattern!r} is a folder; pass a glob of its files instead, e.g. '{pattern}/*.txt'."
            )
        elif not Path(pattern).is_file():
            raise FileNotFoundError(f"No such file: {pattern!r} (the `files` metadata key).")
        else:
            matches = [pattern]
        for match in matches:
            path = Path(match)
            if path not in resolved:  # a file named twice (e.g. by two globs) is read once
                resolved.append(path)
    for path in resolved:
        _check_readable(path, _builder_for(path))  # fail before loading anything
    return resolved


def _check_readable(path: Path, builder: str) -> None:
    """Text files must be UTF-8 text and parquet files parquet: name the file otherwise."""
    if builder == "parquet":
        with open(path, "rb") as fh:
            if fh.read(4) != b"PAR1":
                raise ValueError(
                    f"{str(path)!r} is not a parquet file (no PAR1 header); "
                    "fix the file or give it its real extension (the `files` metadata key)"
                )
        return
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as fh:
        while True:
            block = fh.read(1 << 20)
            if b"\x00" in block:
                raise ValueError(
                    f"{str(path)!r} looks binary (NUL byte at offset {offset + block.index(0)}); "
                    "the `local` dataset reads UTF-8 text: drop it from `files`"
                )
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as exc:
                raise ValueError(
                    f"{str(path)!r} is not UTF-8 text (invalid byte near offset {offset + exc.start}); convert "
                    "it, e.g. `iconv -f latin1 -t utf-8`, or drop it from `files`"
                ) from None
            if not block:
                return
            offset += len(block)


def _builder_for(path: Path) -> str:
    """The datasets builder that reads this file, or an error naming the supported extensions."""
    builder = LOCAL_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(
            f"Unsupported file type {path.suffix or '(none)'!r} for {str(path)!r}; "
            f"the `local` dataset reads {', '.join(LOCAL_BUILDERS)}."
        )
    return builder


def _load_local_file(path: Path, text_field: str, title_field: str | None) -> datasets.Dataset:
    """One local file as a Dataset with exactly the columns ``title`` and ``text``."""
    builder = _builder_for(path)
    if builder == "text":
        # sample_by="document": the whole file is one row (read in text mode, so \r\n -> \n).
        ds = datasets.load_dataset("text", data_files=str(path), sample_by="document", split="train")
        return _with_text_and_title(ds, list(ds["text"]), [path.name], keep_others=False)
    ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    texts = _text_column(ds, text_field, str(path))
    if title_field:
        titles = [str(t) for t in _column(ds, title_field, str(path), "title_field")]
    else:
        titles = [f"{path.name}[{i}]" for i in range(len(ds))]
    return _with_text_and_title(ds, texts, titles, keep_others=False)


def _column(ds: datasets.Dataset, field: str, source: str, key: str) -> list:
    """A column's values, or an error naming the columns there are and the key to change."""
    if field not in ds.column_names:
        raise ValueError(
            f"{source} has no column {field!r} (set by `{key}`); its columns are "
            f'{ds.column_names}. Pass the right one, e.g. --metadata \'{{"{key}": "..."}}\'.'
        )
    return list(ds[field])


def _text_column(ds: datasets.Dataset, text_field: str, source: str) -> list[str]:
    """The document texts, checked to be strings (a list or number column is not a document)."""
    texts = _column(ds, text_field, source, "text_field")
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise TypeError(
            f"{source}: column {text_field!r} row {bad} is {type(texts[bad]).__name__}, not text; "
            f"choose a string column with `text_field` (columns: {ds.column_names})."
        )
    return texts


def _with_text_and_title(
    ds: datasets.Dataset, texts: list[str], titles: list[str], keep_others: bool
) -> datasets.Dataset:
    """A Dataset with string columns ``title`` and ``text`` (from the given lists) first.

    With ``keep_others`` the other columns of ``ds`` follow (hub datasets keep their metadata);
    any old ``title``/``text`` column is replaced by the new one.
    """
    features = datasets.Features({"title": datasets.Value("string"), "text": datasets.Value("string")})
    new = datasets.Dataset.from_dict({"title": titles, "text": texts}, features=features)
    others = [c for c in ds.column_names if c not in ("title", "text")]
    if not keep_others or not others:
        return new
    return datasets.concatenate_datasets([new, ds.select_columns(others)], axis=1)
