"""The vocabulary follows the tokenizer: trained from scratch the model's vocabulary is the
tokenizer's size padded to --model.vocab_multiple, and the padded rows are out of the loss;
a checkpoint's vocabulary must hold the tokenizer's ids."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from plait.cli import main, train
from plait.job import padded_vocabulary
from plait.step import token_cross_entropy

pytest.importorskip("plait_llama3")


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory) -> tuple[Path, int]:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(["def f(x):\n    return x + 1\n", "import os, sys\n"] * 50, trainer=trainer)
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    backend.save(str(path))
    return path, backend.get_vocab_size(with_added_tokens=True)


def job(dump: Path, *extra: str, flavor: str = "debugmodel_tiny") -> list[str]:
    return ["--config", "llama3_debugmodel", "--model.flavor", flavor, "--training.steps", "2",
            "--training.seq_len", "32", "--training.local_batch_size", "2", "--metrics.progress", "off",
            "--job.dump_folder", str(dump), *extra]


def printed_config(capsys, argv: list[str]) -> dict:
    assert main(["train", *argv, "--print-config"]) == 0
    return json.loads(capsys.readouterr().out)


def test_from_scratch_the_vocabulary_is_the_tokenizers_padded(tmp_path, capsys, small_tokenizer):
    path, size = small_tokenizer
    assert size % 64 and size < 2048  # the flavor's vocabulary is 2048: it must not be used
    config = printed_config(capsys, job(tmp_path, "--data.tokenizer", str(path)))
    assert config["model_args"]["vocab_size"] == padded_vocabulary(size, 128)
    exact = printed_config(capsys, job(tmp_path, "--data.tokenizer", str(path), "--model.vocab_multiple", "1"))
    assert exact["model_args"]["vocab_size"] == size
    flavor = printed_config(capsys, job(tmp_path, "--data.tokenizer", str(path), "--model.vocab", "flavor"))
    assert flavor["model_args"]["vocab_size"] == 2048

    result = train(job(tmp_path / "run", "--data.tokenizer", str(path), "--model.vocab_multiple", "64"))
    assert all(torch.isfinite(torch.tensor(list(result.losses.values()))))
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    padded = padded_vocabulary(size, 64)
    assert saved["model_args"]["vocab_size"] == padded

    # The padded rows were never trained down: the export tells transformers not to sample them.
    assert main(["convert", str(tmp_path / "run" / "checkpoint" / "step-2"), str(tmp_path / "hf")]) == 0
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["suppress_tokens"] == list(range(size, padded))
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    prompt = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        best = model(prompt).logits[0, -1, :size].argmax()
        model.lm_head.weight[size:] = 10 * model.lm_head.weight[best]  # padded rows now win the next token
    assert int(model.generate(prompt, max_new_tokens=1, do_sample=False, suppress_tokens=[])[0, -1]) >= size
    assert int(model.generate(prompt, max_new_tokens=4, do_sample=False).max()) < size


def test_padded_rows_are_out_of_the_softmax():
    logits = torch.randn(2, 5, 12, requires_grad=True)
    labels = torch.randint(0, 9, (2, 5))
    loss = token_cross_entropy(logits, labels, vocabulary=9)
    loss.backward()
    torch.testing.assert_close(loss, F.cross_entropy(logits[..., :9].reshape(-1, 9), labels.reshape(-1)),
                               rtol=1e-6, atol=1e-6)
    assert torch.count_nonzero(logits.grad[..., 9:]) == 0 and torch.count_nonzero(logits.grad[..., :9]) > 0


def test_a_vocabulary_sharded_over_ranks_masks_each_ranks_own_columns():
    """tp's loss parallelism: rank 1 of 2 holds columns 6..11 of 12; with 8 real ids its
    last 4 are padding. (A fake process group: no other process is needed.)"""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    from plait.step import mask_padded_logits

    assert not dist.is_initialized()
    dist.init_process_group("fake", rank=1, world_size=2, store=FakeStore())
    try:
        full = torch.arange(24.0).reshape(2, 12)
        sharded = DTensor.from_local(full[:, 6:].clone(), init_device_mesh("cpu", (2,)), [Shard(-1)],
                                     shape=full.shape, stride=full.stride())
        local = mask_padded_logits(sharded, 8).to_local()
    finally:
        dist.destroy_process_group()
    inf = float("-inf")
    assert local.tolist() == [[6.0, 7.0, inf, inf, inf, inf], [18.0, 19.0, inf, inf, inf, inf]]


def test_a_tokenizer_larger_than_the_checkpoints_vocabulary_is_refused(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    code = main(["train", *job(tmp_path / "run", "--model.hf_dir", str(tmp_path / "hf"), flavor="")])
    err = capsys.readouterr().err
    assert code == 2 and "has 2,048 tokens, more than the vocabulary of 256" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
    code = main(["train", *job(tmp_path / "run", "--model.args.vocab_size", "1000")])
    err = capsys.readouterr().err
    assert code == 2 and "more than the vocabulary of 1,000 that --model.args.vocab_size gives" in err
