"""Model variants without downloads: a base model folder plus config overrides (RoPE scaling).

A variant is materialised once as an ordinary model folder: ``config.json`` with the overrides
merged in, the tokenizer and other small files copied, the weight files symlinked (never
copied). Every loader that reads a folder (``--model hf``, ``--model vllm``) then loads it like
any other model. The RoPE shorthand ``rope: {type, factor, original_max_position_embeddings}``
is written in the form the installed transformers reads: transformers 5 keeps RoPE settings
in ``rope_parameters`` (``rope_type``, ``factor``, ``rope_theta``, and for YaRN
``original_max_position_embeddings``); older versions read ``rope_scaling``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from lm_eval_longshort.sweep.checks import non_finite

ROPE_TYPES = ("linear", "dynamic", "yarn")
ROPE_KEYS = ("type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".msgpack", ".h5")
LARGE_FILE = 16 << 20  # bytes: any bigger file is linked, whatever its name
MARKER = ".sweep-variant.json"  # written last: the folder is complete and made from this description


def rope_config_key() -> str:
    """Where the installed transformers reads RoPE scaling: ``rope_parameters`` (5.x) or ``rope_scaling``."""
    from transformers import PretrainedConfig

    return "rope_parameters" if hasattr(PretrainedConfig, "convert_rope_params_to_dict") else "rope_scaling"


def known_rope_types() -> set[str]:
    """RoPE types this transformers can compute (its ROPE_INIT_FUNCTIONS) plus ``default``."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    return set(ROPE_INIT_FUNCTIONS) | {"default"}


def _looks_like_path(name: str) -> bool:
    """A path rather than a hub id (``org/name``)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def check_model(model: str) -> str | None:
    """None if ``model`` can be found without loading it (a folder with config.json, or a hub id
    in the local cache, or online), else the problem in words."""
    path = Path(model).expanduser()
    if path.is_dir():
        return None if (path / "config.json").is_file() else f"model folder {path} has no config.json"
    if _looks_like_path(model):
        return f"model {model}: no such folder"
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model, "config.json"), str):
        return None
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return (
            f"model '{model}' is neither a local folder nor in the Hugging Face cache (HF_HUB_OFFLINE is "
            "set); give a folder, or download it first"
        )
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(model)
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot be found", with its reason
        return f"cannot find model '{model}': {type(exc).__name__}: {str(exc).splitlines()[0]}"
    return None


def model_folder(model: str) -> Path:
    """The local folder of a model: the folder itself, or its snapshot in the Hugging Face cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, local_files_only=True))


def model_config(model: str) -> dict:
    """The model's config.json as a mapping ({} when it cannot be read without a download)."""
    try:
        return json.loads((model_folder(model) / "config.json").read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001 - only a hint for the model_args check: any failure means "unknown"
        return {}


def _deep_merge(base: dict, top: dict) -> dict:
    """``top`` over ``base``; nested mappings merge key by key (so rope_theta survives a RoPE override)."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def rope_overrides(rope: dict, base_config: dict) -> dict:
    """Config overrides for the ``rope:`` shorthand, in the installed transformers' form.

    linear and YaRN also raise ``max_position_embeddings`` to factor x original (the window the
    scaled model claims; hf's default ``max_length`` follows it); dynamic NTK keeps it, because
    transformers' dynamic scaling starts beyond ``max_position_embeddings``.
    """
    if not isinstance(rope, dict):
        raise ValueError("rope: a mapping such as {type: yarn, factor: 2}")
    unknown = sorted(set(rope) - set(ROPE_KEYS))
    if unknown:
        raise ValueError(f"rope: unknown key(s) {unknown}; known: {', '.join(ROPE_KEYS)}")
    kind = rope.get("type")
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope.type must be one of {', '.join(ROPE_TYPES)}, got {kind!r}")
    factor = _rope_number(rope, "factor", 1, "a finite number >= 1")
    original = rope.get("original_max_position_embeddings")
    if original is not None and not (_is_number(original) and original >= 1 and float(original).is_integer()):
        raise ValueError(f"rope.original_max_position_embeddings must be a whole number >= 1, got {original!r}")
    original = int(original or base_config.get("max_position_embeddings") or 0)
    if original < 1:
        raise ValueError("rope: the base config has no max_position_embeddings; give original_max_position_embeddings")
    if original * factor >= 2**31:
        raise ValueError(f"rope.factor {rope['factor']!r} x {original} positions: beyond any model's range; lower it")
    for key in ("beta_fast", "beta_slow", "attention_factor"):
        if key in rope:
            _rope_number(rope, key, 0, "a finite number > 0", strict=True)
    params = {"rope_type": kind, "factor": float(factor)}
    params |= {k: rope[k] for k in ("beta_fast", "beta_slow", "attention_factor") if k in rope}
    if kind == "yarn":
        params["original_max_position_embeddings"] = original
    out: dict = {}
    key = rope_config_key()
    if key == "rope_scaling":
        params["type"] = kind  # transformers 4 read "type" (older) or "rope_type"
    out[key] = params
    if kind == "dynamic":
        if original != base_config.get("max_position_embeddings"):
            out["max_position_embeddings"] = original
    else:
        out["max_position_embeddings"] = round(original * float(factor))
    return out


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _rope_number(rope: dict, key: str, minimum: float, rule: str, strict: bool = False) -> float:
    """``rope[key]`` if it is a finite number >= ``minimum`` (> with ``strict``), else ValueError."""
    value = rope.get(key)
    if not _is_number(value) or value < minimum or (strict and value == minimum):
        raise ValueError(f"rope.{key} must be {rule}, got {value!r}")
    return float(value)


def _check_overrides(overrides: dict, base_config: dict, base: Path) -> None:
    """Every top-level override is a key the base config has (the RoPE key may be new)."""
    if not isinstance(overrides, dict):
        raise ValueError("overrides: a mapping of config.json keys to new values")
    bad = non_finite(overrides, "overrides")
    if bad:
        raise ValueError(f"{bad[0][0]} is {bad[0][1]!r}: config values must be finite numbers")
    rope_key = rope_config_key()
    missing = sorted(k for k in overrides if k not in base_config and k != rope_key)
    if missing:
        hint = (
            f"; this transformers reads RoPE scaling from '{rope_key}'"
            if {"rope_scaling", "rope_parameters"} & set(missing)
            else ""
        )
        raise ValueError(
            f"overrides {missing}: not keys of {base / 'config.json'}{hint} "
            "(an override must change a setting the model has; check the spelling)"
        )
    rope = overrides.get(rope_key)
    if isinstance(rope, dict):
        kind = rope.get("rope_type", rope.get("type"))
        if kind is not None and kind not in known_rope_types():
            raise ValueError(
                f"overrides.{rope_key}.rope_type {kind!r} is not a RoPE type this transformers "
                f"knows: {', '.join(sorted(known_rope_types()))}"
            )


@dataclass(frozen=True)
class Variant:
    """A base model folder and the config overrides that make the variant."""

    base: Path
    overrides: dict = field(default_factory=dict)

    def describe(self) -> dict:
        """JSON-able identity of the variant (stored in the folder; a change rebuilds it)."""
        return {"base": str(self.base), "overrides": self.overrides}

    def base_config(self) -> dict:
        return json.loads((self.base / "config.json").read_text(encoding="utf-8"))

    def config(self) -> dict:
        """The variant's config.json content."""
        return _deep_merge(self.base_config(), self.overrides)

    def materialise(self, folder: str | Path) -> Path:
        """Write the variant folder once (atomically: built beside it, then renamed into place).

        Workers computing pieces of one sharded run may materialise it at the same moment: each
        builds its own copy, the first rename wins, and the others keep the (identical) winner.
        """
        folder = Path(folder)
        if self._written(folder):
            return folder
        tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for item in sorted(self.base.iterdir()):
            if item.name.startswith(".") or item.is_dir():
                continue
            target = tmp / item.name
            if item.name == "config.json":
                target.write_text(json.dumps(self.config(), indent=2) + "\n", encoding="utf-8")
            elif item.suffix in WEIGHT_SUFFIXES or item.stat().st_size > LARGE_FILE:
                target.symlink_to(item.resolve())  # weights: linked, never copied
            else:
                shutil.copy2(item, target)
        (tmp / MARKER).write_text(json.dumps(self.describe(), indent=2), encoding="utf-8")
        if folder.exists() and not self._written(folder):
            shutil.rmtree(folder)  # another variant's folder
        try:
            os.replace(tmp, folder)
        except OSError:  # another worker put its copy in place meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
            if not self._written(folder):
                raise
        return folder

    def _written(self, folder: Path) -> bool:
        """Whether ``folder`` holds this variant (its marker names these overrides)."""
        marker = folder / MARKER
        return marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == self.describe()


def make_variant(model: str, rope: dict | None = None, overrides: dict | None = None) -> Variant:
    """A validated Variant of ``model`` (a folder or a cached hub id); ValueError naming the problem."""
    base = model_folder(model)
    base_config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    merged = rope_overrides(rope, base_config) if rope is not None else {}
    if overrides is not None:
        _check_overrides(overrides, base_config, base)
        merged = _deep_merge(merged, overrides)
    _check_overrides(merged, base_config, base)
    return Variant(base, merged)
