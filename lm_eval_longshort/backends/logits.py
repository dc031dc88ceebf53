"""Final hidden states -> float32 log-probabilities, outside the model, in chunks.

For backends that get the decoder's final hidden states [T, d] and apply the LM head
themselves (vLLM's pooling route; the hf engine may use it too). A [T, V] tensor is never
built: rows are projected ``chunk_positions`` at a time.

The head is what the model computes after its decoder:
``logits = postprocess(hidden @ weight.T + bias)``, where ``postprocess`` is what the
architecture's config declares (final logit soft-capping, logit scaling). Configs that
declare other logit post-processing are refused by name (``logit_postprocessing``).

API:
- ``OutputHead(weight, bias, scale=, softcap=)``: ``log_softmax(hidden, label, positions)``,
  ``chunks(...)``, ``token_nll(...)``;
- ``logit_postprocessing(config) -> (scale, softcap)`` (raises ``UnsupportedLogitsError``);
- ``load_output_head(model_path, config) -> OutputHead`` from a checkpoint folder
  (raises ``OutputLayerNotFoundError``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from lm_eval_longshort.protocols.requests import NonFiniteLogitsError


class OutputLayerNotFoundError(ValueError):
    """The checkpoint holds no tensor we can use as the model's output layer."""


class UnsupportedLogitsError(ValueError):
    """The architecture transforms logits after the head in a way this module does not apply."""


# Config keys that change logits after the head, and how they are applied here.
SOFTCAP_KEYS = ("final_logit_softcapping",)  # Gemma 2/3: cap * tanh(logits / cap)
MULTIPLY_KEYS = ("logit_scale",)  # Cohere: logits * logit_scale
DIVIDE_KEYS = ("logits_scaling",)  # Granite: logits / logits_scaling
# Keys that look like logit post-processing but act elsewhere (attention, MoE routing).
NOT_LOGIT_KEYS = re.compile(r"attn|attention|router|expert|init|embedding")
LOGIT_LIKE_KEYS = re.compile(r"(logit|lm_head|output).*(scal|cap|mult)|dim_model_base|mup_width")
# Architectures whose logits are changed in ways no config number describes.
REFUSED_ARCHITECTURES = {
    "ChameleonForConditionalGeneration": "masks the logits of image tokens",
    "MiniCPMForCausalLM": "divides hidden states by hidden_size / dim_model_base before the head",
    "MiniCPM3ForCausalLM": "divides hidden states by hidden_size / dim_model_base before the head",
}

TIED_NAMES = (
    "model.embed_tokens.weight",
    "embed_tokens.weight",
    "transformer.wte.weight",
    "wte.weight",
    "gpt_neox.embed_in.weight",
    "model.embed_in.weight",
    "transformer.word_embeddings.weight",
    "word_embeddings.weight",
    "model.language_model.embed_tokens.weight",
)
UNTIED_NAMES = (
    "lm_head.weight",
    "embed_out.weight",
    "output.weight",
    "model.lm_head.weight",
    "language_model.lm_head.weight",
)


def checked_log_softmax(logits: torch.Tensor, label: str, positions) -> torch.Tensor:
    """[k, V] logits -> float32 log-softmax; NonFiniteLogitsError naming the first bad position.

    One row-sum reduction finds non-finite rows (a sum is finite iff every entry is, barring an
    overflow of the sum, which the exact check below clears): ~30x cheaper than isfinite on all.
    """
    logits = logits.float()
    if not bool(torch.isfinite(logits.sum(-1)).all()):
        finite = torch.isfinite(logits).all(-1)
        if not bool(finite.all()):
            bad = int(torch.as_tensor(positions)[~finite.cpu()][0])
            raise NonFiniteLogitsError(
                f"{label}: non-finite logits at input position {bad}; check the model's dtype "
                "(try dtype=float32) and weights"
            )
    return torch.log_softmax(logits, dim=-1)


class OutputHead:
    """An LM head applied outside the model, in float32 (or ``dtype``).

    ``weight`` [V, d], ``bias`` [V] or None; logits are multiplied by ``scale``, then capped
    to ``softcap * tanh(logits / softcap)`` when ``softcap`` is set.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        scale: float = 1.0,
        softcap: float | None = None,
        chunk_positions: int = 1024,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        device = weight.device if device is None else torch.device(device)
        self.weight = weight.to(device=device, dtype=dtype)  # converted once, not per chunk
        self.bias = None if bias is None else bias.to(device=device, dtype=dtype)
        self.scale = float(scale)
        self.softcap = float(softcap) if softcap else None
        self.chunk_positions = int(chunk_positions)

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[1])

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[k, d] -> [k, V] logits after the architecture's post-processing."""
        logits = torch.nn.functional.linear(hidden.to(self.weight), self.weight, self.bias)
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def log_softmax(self, hidden: torch.Tensor, label: str, positions: torch.Tensor) -> torch.Tensor:
        """[k, d] hidden rows -> [k, V] log-softmax; ``positions`` [k] name rows in errors."""
        return checked_log_softmax(self.logits(hidden), label, positions)

    def chunks(self, hidden: torch.Tensor, label: str, positions: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
        """(rows, [r, V] log-softmax) for consecutive slices of at most ``chunk_positions`` rows."""
        for start in range(0, len(hidden), self.chunk_positions):
            rows = slice(start, start + self.chunk_positions)
            yield rows, self.log_softmax(hidden[rows], label, positions[rows])

    def token_nll(
        self, hidden: torch.Tensor, targets: torch.Tensor, label: str, positions: torch.Tensor
    ) -> torch.Tensor:
        """[k] float64 -log p(targets[i] | row i) from [k, d] hidden rows, chunked."""
        targets = targets.to(self.device)
        out = [-logp.gather(1, targets[rows, None])[:, 0] for rows, logp in self.chunks(hidden, label, positions)]
        return torch.cat(out).double().cpu() if out else torch.zeros(0, dtype=torch.float64)


def _config_value(config, key: str):
    """``config.key``, looked up on the config and its text sub-config (multimodal models)."""
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is not None and getattr(cfg, key, None) is not None:
            return getattr(cfg, key)
    return None


def _config_keys(config) -> set[str]:
    keys = set(config.to_dict()) if hasattr(config, "to_dict") else set(vars(config))
    text = getattr(config, "text_config", None)
    return keys | (set(text.to_dict()) if hasattr(text, "to_dict") else set())


def logit_postprocessing(config) -> tuple[float, float | None]:
    """(scale, softcap) that the architecture applies to logits after the head.

    Raises ``UnsupportedLogitsError`` naming the architecture and the config key when the
    config declares post-processing this module does not apply.
    """
    arch = ",".join(getattr(config, "architectures", None) or [type(config).__name__])
    for name in getattr(config, "architectures", None) or []:
        if name in REFUSED_ARCHITECTURES:
            raise UnsupportedLogitsError(
                f"{name} {REFUSED_ARCHITECTURES[name]}: the hidden-state route cannot reproduce its "
                "logits; run it with --model vllm without runner=pooling (prompt log-probabilities) or --model hf"
            )
    scale, softcap = 1.0, None
    for key in MULTIPLY_KEYS:
        scale *= float(_config_value(config, key) or 1.0)
    for key in DIVIDE_KEYS:
        scale /= float(_config_value(config, key) or 1.0)
    for key in SOFTCAP_KEYS:
        softcap = float(_config_value(config, key) or 0.0) or softcap
    handled = set(SOFTCAP_KEYS + MULTIPLY_KEYS + DIVIDE_KEYS)
    for key in sorted(_config_keys(config) - handled):
        if not LOGIT_LIKE_KEYS.search(key) or NOT_LOGIT_KEYS.search(key):
            continue
        value = _config_value(config, key)
        if value is None or isinstance(value, bool) or value == (0 if "cap" in key else 1):
            continue  # absent, a flag, or a no-op value
        raise UnsupportedLogitsError(
            f"{arch}: its config sets {key}={value!r}, logit post-processing the hidden-state route does "
            "not apply; run it with --model vllm without runner=pooling (prompt log-probabilities) or --model hf"
        )
    return scale, softcap


def _weight_files(folder: Path) -> tuple[dict[str, Path], str]:
    """{tensor name: file} of a checkpoint folder, and its format ("safetensors" or "bin")."""
    for pattern, kind in (("*.safetensors", "safetensors"), ("*.bin", "bin")):
        files = sorted(p for p in folder.glob(pattern) if not p.name.startswith("training_args"))
        if not files:
            continue
        index = next(iter(folder.glob(f"*{pattern[1:]}.index.json")), None)
        if index is not None:
            weight_map = json.loads(index.read_text())["weight_map"]
            return {name: folder / file for name, file in weight_map.items()}, kind
        names: dict[str, Path] = {}
        for file in files:
            for name in _tensor_names(file, kind):
                names[name] = file
        return names, kind
    return {}, ""


def _tensor_names(file: Path, kind: str) -> list[str]:
    if kind == "safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as fh:
            return list(fh.keys())
    return list(torch.load(file, map_location="meta", weights_only=True, mmap=True))


def _read_tensor(file: Path, kind: str, name: str) -> torch.Tensor:
    if kind == "safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as fh:
            return fh.get_tensor(name)
    return torch.load(file, map_location="cpu", weights_only=True, mmap=True)[name]


def tied_embeddings(config) -> bool:
    """Whether the model reuses its input embeddings as its output layer (transformers' rule)."""
    value = _config_value(config, "tie_word_embeddings")
    return bool(value) if value is not None else False


def _pick_name(names: dict[str, Path], tied: bool) -> str | None:
    """The checkpoint name of the output layer's weight: a known name, else a unique suffix match."""
    candidates = TIED_NAMES if tied else UNTIED_NAMES
    for name in candidates:
        if name in names:
            return name
    suffix = ".embed_tokens.weight" if tied else ".lm_head.weight"
    matches = [n for n in names if n.endswith(suffix)]
    return matches[0] if len(matches) == 1 else None


def load_output_head(
    model_path: str | Path, config, *, device: torch.device | str = "cpu", chunk_positions: int = 1024
) -> OutputHead:
    """The output layer of the checkpoint in ``model_path`` (a folder), with its post-processing.

    ``lm_head.weight`` (or the architecture's name for it), or the input embeddings when
    ``tie_word_embeddings``; checked against the config's vocabulary and hidden sizes.
    """
    scale, softcap = logit_postprocessing(config)  # refuse before reading any weights
    folder = Path(model_path)
    names, kind = _weight_files(folder)
    tied = tied_embeddings(config)
    what = "tied input embeddings (tie_word_embeddings=true)" if tied else "untied output layer (lm_head)"
    if not names:
        raise OutputLayerNotFoundError(
            f"cannot find the model's output layer: no *.safetensors or *.bin weights in {folder}; the "
            "hidden-state route reads the LM head from a Hugging Face checkpoint folder"
        )
    name = _pick_name(names, tied)
    if name is None:
        raise OutputLayerNotFoundError(
            f"cannot find the model's {what} in the checkpoint {folder}: none of "
            f"{', '.join(TIED_NAMES if tied else UNTIED_NAMES)} is among its {len(names)} tensors; the "
            "hidden-state route needs the LM head weights (a checkpoint saved from a *ForCausalLM model)"
        )
    weight = _read_tensor(names[name], kind, name)
    bias_name = name[: -len("weight")] + "bias"
    bias = _read_tensor(names[bias_name], kind, bias_name) if not tied and bias_name in names else None
    _check_head(weight, config, f"{name} in {folder}")
    return OutputHead(weight, bias, scale=scale, softcap=softcap, device=device, chunk_positions=chunk_positions)


def _check_head(weight: torch.Tensor, config, where: str) -> None:
    if not weight.is_floating_point() or weight.dim() != 2:
        raise OutputLayerNotFoundError(
            f"{where} is a {weight.dim()}-d {weight.dtype} tensor, not a floating-point [vocab, hidden] "
            "matrix (a quantized output layer?); the hidden-state route needs an unquantized LM head"
        )
    hidden = _config_value(config, "hidden_size")
    if hidden is not None and weight.shape[1] != int(hidden):
        raise OutputLayerNotFoundError(
            f"{where} has shape {tuple(weight.shape)}, but the config's hidden_size is {hidden}"
        )
