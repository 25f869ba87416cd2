"""Train, `plait convert` the checkpoint, load it with transformers: same logits."""
import pytest
import torch

import plait
from plait.cli import main, train

from e2e_helpers import tiny_job


def test_trained_checkpoint_converts_to_a_folder_transformers_loads(tmp_path, capsys):
    train(tiny_job(tmp_path / "run", "--checkpoint.interval", "3", steps=3))
    out = tmp_path / "hf"
    assert main(["convert", str(tmp_path / "run" / "checkpoint" / "step-3"), str(out)]) == 0
    assert "llama3/debugmodel_tiny" in capsys.readouterr().out

    from transformers import LlamaForCausalLM

    reference = LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    ours = plait.from_pretrained("llama3", str(out))
    tokens = torch.randint(0, 2048, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(tokens).logits
        got = ours(tokens)
    assert got.shape == (2, 24, 2048)
    assert torch.allclose(got, expected, atol=1e-4, rtol=0)
    # and they are the trained weights of step 3
    from plait.checkpoint import load_model_state
    from plait.plugins import load_model_spec

    spec = load_model_spec("llama3")
    model = spec.build(spec.args_for("debugmodel_tiny"))
    with torch.no_grad():
        model.init_weights()
        model.tok_embeddings.weight.zero_()  # must be overwritten by the load below
    load_model_state(str(tmp_path / "run" / "checkpoint" / "step-3"), model.state_dict())
    with torch.no_grad():
        assert torch.allclose(model.eval()(tokens), got, atol=1e-5, rtol=0)


def test_convert_without_run_config_asks_for_model(tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    assert main(["convert", str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 2
    assert "pass --model and --flavor" in capsys.readouterr().err


def test_training_starts_from_hf_weights_and_refuses_a_mismatch(tmp_path):
    train(tiny_job(tmp_path / "run", "--checkpoint.interval", "3", steps=3))
    hf = tmp_path / "hf"
    assert main(["convert", str(tmp_path / "run" / "checkpoint" / "step-3"), str(hf)]) == 0

    from plait.config import DataSection
    from plait.data import build_dataloader, build_tokenizer
    from plait.step import token_cross_entropy

    tokenizer = build_tokenizer("")
    inputs, labels = next(build_dataloader(DataSection(), tokenizer, seq_len=64, local_batch_size=4,
                                           dp_rank=0, dp_world_size=1))
    with torch.no_grad():
        expected = token_cross_entropy(plait.from_pretrained("llama3", str(hf))(inputs), labels).item()
    started = train(tiny_job(tmp_path / "from_hf", "--model.hf_dir", str(hf), steps=1))
    assert abs(started.losses[1] - expected) < 1e-5

    from plait.errors import ConfigError
    import pytest

    with pytest.raises(ConfigError, match="--model.flavor debugmodel does not match the checkpoint .*--model.flavor ''"):
        train(tiny_job(tmp_path / "mismatch", "--model.hf_dir", str(hf), "--model.flavor", "debugmodel", steps=1))


def test_the_export_is_complete_for_transformers_tokenizer_and_generate(tmp_path):
    """Weights, config with bos/eos ids, generation_config.json and the run's tokenizer:
    AutoTokenizer encodes like plait, and AutoModelForCausalLM loads it and generates."""
    transformers = pytest.importorskip("transformers")
    train(tiny_job(tmp_path / "run", "--checkpoint.interval", "2", steps=2))
    out = tmp_path / "hf"
    assert main(["convert", str(tmp_path / "run" / "checkpoint" / "step-2"), str(out), "--dtype", "bfloat16"]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (out / name).is_file(), name
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    from plait.data import build_tokenizer

    ours = build_tokenizer("")
    text = "def main():\n    return 42"
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    assert (model.config.bos_token_id, model.config.eos_token_id) == (ours.bos_id, ours.eos_id)
    assert model.generation_config.eos_token_id == ours.eos_id
    prompt = tokenizer([text], return_tensors="pt", add_special_tokens=False)
    generated = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] <= prompt["input_ids"].shape[1] + 5
