"""Pooled final hidden states (:mod:`deepwhale.inference.embeddings`) on the bundled model."""

from __future__ import annotations

import pytest
import torch

from deepwhale.api import DeepSeekModel
from deepwhale.inference.embeddings import embed

TEXTS = ["Once upon a time", "Lily", "The cat sat on the mat and looked at the bird."]


@pytest.fixture(scope="module")
def model():
    return DeepSeekModel.from_pretrained(device="cpu")


def test_hidden_states_are_what_lm_head_reads(model):
    ids = torch.tensor([model.tokenizer.encode(TEXTS[0])])
    with torch.inference_mode():
        h = model.module.hidden_states(ids)
        assert h.shape == (1, ids.shape[1], model.config.hidden_size)
        torch.testing.assert_close(model.module.lm_head(h), model.module(ids))


def test_groups_and_padding_do_not_change_the_vectors(model):
    ids = [model.tokenizer.encode(t) for t in TEXTS]
    one_pass = embed(model.module, ids)
    per_token = embed(model.module, ids, max_batch_tokens=1)  # every input alone
    torch.testing.assert_close(one_pass, per_token, atol=1e-5, rtol=0)
    assert one_pass.dtype == torch.float32 and one_pass.shape == (3, model.config.hidden_size)
    torch.testing.assert_close(one_pass.norm(dim=-1), torch.ones(3))
    raw = model.embed(TEXTS, pooling="last", normalize=False)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(
        torch.nn.functional.normalize(raw, dim=-1), model.embed(TEXTS, "last")
    )


def test_bad_pooling_and_empty_inputs(model):
    with pytest.raises(ValueError, match="pooling must be one of mean, last"):
        embed(model.module, [[1, 2]], pooling="max")
    with pytest.raises(ValueError, match="at least one token"):
        embed(model.module, [[1], []])
    assert model.embed("Once").shape == (1, model.config.hidden_size)
