"""Named-tensor batches of models that bring their own data pipeline."""
import pytest
import torch

from plait.data.batch import TensorBatch, call_model


def test_tensor_batch_moves_splits_and_joins():
    batch = TensorBatch(a=torch.arange(8.0).view(4, 2), b=torch.arange(4))
    assert batch.batch_size == 4 and batch.device.type == "cpu"
    moved = batch.to("meta")
    assert isinstance(moved, TensorBatch) and moved["a"].device.type == "meta"
    halves = batch.split(2)
    assert [h["b"].tolist() for h in halves] == [[0, 1], [2, 3]]
    joined = TensorBatch.concat(halves)
    assert all(torch.equal(joined[name], batch[name]) for name in batch)
    with pytest.raises(ValueError, match="cannot split a batch of 4 into 3"):
        batch.split(3)


def test_call_model_passes_named_inputs_as_keywords_and_tokens_positionally():
    def model(tokens=None, *, a=None, b=None):
        return ("tokens", tokens) if tokens is not None else ("named", a, b)

    assert call_model(model, TensorBatch(a=torch.ones(1), b=torch.zeros(1)))[0] == "named"
    assert call_model(model, torch.ones(1, 3))[0] == "tokens"
