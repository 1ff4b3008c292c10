"""Fine-tuning experiment pieces: length-bucketed batches and the regressor head on a tiny random encoder."""

from __future__ import annotations

import numpy as np
import pytest

from predictor.finetune_length import LengthRegressor, length_batches


def test_length_batches_cover_every_item_once_with_little_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, size=1000)
    batches = length_batches(lengths, batch_size=32, rng=np.random.default_rng(1), window=10)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(1000))
    assert max(len(b) for b in batches) == 32
    # Sorted within windows: a batch's length spread is far below the data's.
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    assert spread < 0.25 * np.ptp(lengths)


def test_length_regressor_trains_on_a_tiny_encoder():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32)
    encoder = transformers.BertModel(config)

    class Tok:
        pad_token_id = 0

    # Token 5 means "long answer", token 6 "short answer": the model must learn to tell them apart.
    ids = [[1, 5, 5, 2], [1, 6, 2], [1, 5, 2], [1, 6, 6, 6, 2]] * 4
    y = np.log1p([900, 20, 900, 20] * 4)
    texts = [" ".join(map(str, x)) for x in ids]
    model = LengthRegressor(encoder, Tok(), lambda ts: [list(map(int, t.split())) for t in ts], y.mean(), y.std())
    # The head starts at zero: every prediction is the training mean.
    before = model.predict(texts[:4], [10] * 4)
    assert np.allclose(before, np.expm1(y.mean()))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    target = torch.tensor((y - y.mean()) / y.std(), dtype=torch.float32)
    model.encoder.train()
    for _ in range(60):
        loss = torch.nn.functional.mse_loss(model.forward(ids, [10] * len(ids)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.predict(texts[:4], [10] * 4)
    assert after[0] > 300 and after[2] > 300 and after[1] < 60 and after[3] < 60
