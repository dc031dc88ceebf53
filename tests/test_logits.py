"""backends/logits.py: the LM head read from a checkpoint equals the model's own output layer.

Each architecture is a small model built from a config with random weights, saved to a
folder; the reference is transformers' own forward (``model(ids).logits``), the value under
test the head loaded from the saved files applied to the decoder's final hidden states.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from reference import plain_nll, plain_token_logprobs

from lm_eval_longshort.backends.logits import (
    OutputHead,
    OutputLayerNotFoundError,
    UnsupportedLogitsError,
    load_output_head,
    logit_postprocessing,
)
from lm_eval_longshort.protocols.requests import NonFiniteLogitsError

SMALL = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=256,
)

CASES = {
    # name: (model class, config, what the case exercises)
    "llama untied": (transformers.LlamaForCausalLM, transformers.LlamaConfig(**SMALL, tie_word_embeddings=False)),
    "llama tied": (transformers.LlamaForCausalLM, transformers.LlamaConfig(**SMALL, tie_word_embeddings=True)),
    "gemma2 soft-capping": (
        transformers.Gemma2ForCausalLM,
        transformers.Gemma2Config(**SMALL, head_dim=32, final_logit_softcapping=2.0),
    ),
    "cohere logit_scale": (transformers.CohereForCausalLM, transformers.CohereConfig(**SMALL, logit_scale=0.5)),
    "granite logits_scaling": (
        transformers.GraniteForCausalLM,
        transformers.GraniteConfig(**SMALL, logits_scaling=4.0),
    ),
    "gpt-neox embed_out": (
        transformers.GPTNeoXForCausalLM,
        transformers.GPTNeoXConfig(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            tie_word_embeddings=False,
        ),
    ),
}


def _saved(model_class, config, folder):
    """A random-weight model with peaked output distributions, saved to ``folder``."""
    torch.manual_seed(0)
    config.architectures = [model_class.__name__]
    model = model_class(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0.0, 1.0)  # logits of several units: post-processing shows
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_head_from_checkpoint_equals_the_models_logits(case, tmp_path):
    model_class, config = CASES[case]
    model = _saved(model_class, config, tmp_path)
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(1))
    want = plain_token_logprobs(model, ids[0].tolist())  # [T, V]
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids).last_hidden_state[0]  # [T, d]
    head = load_output_head(tmp_path, transformers.AutoConfig.from_pretrained(tmp_path), chunk_positions=16)
    positions = torch.arange(len(hidden))
    got = torch.cat([logp for _, logp in head.chunks(hidden, case, positions)])
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-4, case
    # The post-processing matters in these cases: the bare matrix product would be far off.
    bare = torch.log_softmax(hidden.float() @ head.weight.T, -1)
    post = head.scale != 1.0 or head.softcap is not None
    assert ((bare - want).abs().max().item() > 0.1) == post, case
    nll = head.token_nll(hidden[:-1], ids[0, 1:], case, positions[:-1])
    assert nll.dtype == torch.float64
    torch.testing.assert_close(nll, plain_nll(model, ids[0].tolist(), 1), atol=1e-4, rtol=0)


def test_missing_output_layer_names_what_is_missing(tmp_path):
    """An untied config whose checkpoint lacks lm_head (a base-model save), and a folder without weights."""
    model = _saved(
        transformers.LlamaForCausalLM, transformers.LlamaConfig(**SMALL, tie_word_embeddings=False), tmp_path
    )
    model.model.save_pretrained(tmp_path / "base")  # decoder only: no lm_head.weight
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    with pytest.raises(
        OutputLayerNotFoundError, match=r"cannot find the model's untied output layer \(lm_head\).*lm_head\.weight"
    ):
        load_output_head(tmp_path / "base", config)
    (tmp_path / "empty").mkdir()
    with pytest.raises(OutputLayerNotFoundError, match=r"no \*\.safetensors or \*\.bin weights"):
        load_output_head(tmp_path / "empty", config)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            transformers.FalconH1Config(lm_head_multiplier=0.5, architectures=["FalconH1ForCausalLM"]),
            r"FalconH1ForCausalLM: its config sets lm_head_multiplier=0.5",
        ),
        (
            transformers.LlamaConfig(mup_width_multiplier=8.0, architectures=["Phi3SmallForCausalLM"]),
            r"Phi3SmallForCausalLM: its config sets mup_width_multiplier=8.0",
        ),
        (transformers.LlamaConfig(architectures=["MiniCPMForCausalLM"]), r"MiniCPMForCausalLM divides hidden states"),
    ],
    ids=["falcon-h1", "phi3-small", "minicpm"],
)
def test_unapplied_logit_postprocessing_is_refused_by_name(config, message):
    with pytest.raises(UnsupportedLogitsError, match=message):
        logit_postprocessing(config)


def test_noop_and_internal_settings_are_accepted():
    """No-op multipliers and attention/router soft-caps are not logit post-processing."""
    assert logit_postprocessing(transformers.FalconH1Config(lm_head_multiplier=1.0)) == (1.0, None)
    assert logit_postprocessing(transformers.Gemma2Config(final_logit_softcapping=None)) == (1.0, None)
    assert logit_postprocessing(transformers.Gemma2Config()) == (1.0, 30.0)  # attn_logit_softcapping ignored
    assert logit_postprocessing(transformers.CohereConfig(logit_scale=0.25)) == (0.25, None)


def test_non_finite_logits_name_the_position():
    head = OutputHead(torch.eye(4))
    hidden = torch.zeros(3, 4)
    hidden[2, 1] = float("nan")
    with pytest.raises(NonFiniteLogitsError, match=r"doc x: non-finite logits at input position 12"):
        head.log_softmax(hidden, "doc x", torch.tensor([10, 11, 12]))
