"""Continue a Hugging Face checkpoint of any shape: the model's shape comes from its
config.json (no flavor), a few steps train, and the export loads in transformers with
logits equal to plait's."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import plait
from plait.cli import main, train

transformers = pytest.importorskip("transformers")
pytest.importorskip("plait_qwen3")

VOCAB = 2048  # the embedded tokenizer's: the checkpoints continue on the embedded corpus


def llama32_like(folder: Path) -> None:
    """Tied embeddings and a shape no llama3 flavor has (Llama 3.2's traits, tiny)."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)


def qwen3_wide_heads(folder: Path) -> None:
    """A head_dim (32) that is not hidden_size / heads (16)."""
    config = transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(config).save_pretrained(folder)


CASES = {"llama3": llama32_like, "qwen3": qwen3_wide_heads}


@pytest.mark.parametrize("model", list(CASES))
def test_continue_an_hf_checkpoint_of_any_shape_and_export_it_back(tmp_path: Path, model: str) -> None:
    hf_in, run, hf_out = tmp_path / "hf_in", tmp_path / "run", tmp_path / "hf_out"
    CASES[model](hf_in)
    result = train([
        "--model", model, "--model.hf_dir", str(hf_in), "--training.steps", "2", "--training.seq_len", "32",
        "--training.local_batch_size", "2", "--metrics.progress", "off", "--metrics.enable_tensorboard", "False",
        "--job.dump_folder", str(run),
    ])  # fmt: skip
    assert sorted(result.losses) == [1, 2] and all(loss < 9 for loss in result.losses.values())
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"]["flavor"] == "" and saved["model_args"]["vocab_size"] == VOCAB

    assert main(["convert", str(run / "checkpoint" / "step-2"), str(hf_out)]) == 0
    exported = json.loads((hf_out / "config.json").read_text())
    original = json.loads((hf_in / "config.json").read_text())
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "max_position_embeddings", "tie_word_embeddings", "head_dim"):
        if key in original:
            assert exported.get(key) == original[key], key

    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    ours = plait.from_pretrained(model, str(hf_out))(tokens)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_out, dtype=torch.float32).eval()(tokens).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    before = transformers.AutoModelForCausalLM.from_pretrained(hf_in, dtype=torch.float32).eval()(tokens).logits
    assert (before - theirs).abs().max().item() > 1e-4  # the two steps changed the weights


def test_a_flavor_that_disagrees_with_the_checkpoint_names_the_fields(tmp_path: Path, capsys) -> None:
    llama32_like(tmp_path / "hf")
    code = main(["train", "--config", "llama3_debugmodel", "--model.hf_dir", str(tmp_path / "hf"),
                 "--job.dump_folder", str(tmp_path / "run")])
    output = capsys.readouterr().err
    assert code == 2
    assert "--model.flavor debugmodel does not match the checkpoint" in output
    assert "dim: flavor 256, checkpoint 48" in output and "--model.flavor ''" in output


def test_model_args_from_the_command_line_and_a_saved_config_round_trip(tmp_path: Path) -> None:
    first = train(["--config", "llama3_debugmodel", "--model.flavor", "debugmodel_tiny", "--model.args.n_layers", "3",
                   "--training.steps", "2", "--training.seq_len", "32", "--training.local_batch_size", "2",
                   "--metrics.progress", "off", "--job.dump_folder", str(tmp_path / "a")])
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    assert saved["model"]["args"] == {"n_layers": 3} and saved["model_args"]["n_layers"] == 3
    again = train(["--config", str(tmp_path / "a" / "config.json"), "--job.dump_folder", str(tmp_path / "b")])
    assert again.losses == first.losses
    reloaded = json.loads((tmp_path / "b" / "config.json").read_text())
    assert {k: v for k, v in reloaded.items() if k != "job"} == {k: v for k, v in saved.items() if k != "job"}
    assert sorted(p.name for p in (tmp_path / "a" / "configs").iterdir()) == ["attempt-1.json"]


def test_print_config_prints_what_the_run_would_save_and_writes_nothing(tmp_path: Path, capsys) -> None:
    saved = tmp_path / "a" / "config.json"
    argv = ["--config", "llama3_debugmodel", "--model.flavor", "debugmodel_tiny", "--model.args.n_layers", "3",
            "--training.steps", "1", "--training.seq_len", "32", "--training.local_batch_size", "2",
            "--metrics.progress", "off", "--job.dump_folder", str(tmp_path / "a")]
    assert main(["train", *argv, "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert not (tmp_path / "a").exists()
    train(argv)
    assert printed == json.loads(saved.read_text())
    capsys.readouterr()  # the run's log
    assert main(["train", "--config", str(saved), "--training.steps", "5", "--print_config", "True"]) == 0
    assert json.loads(capsys.readouterr().out) == {**printed, "training": {**printed["training"], "steps": 5}}


def test_resuming_another_model_shape_is_refused(tmp_path: Path, capsys) -> None:
    common = ["--config", "llama3_debugmodel", "--model.flavor", "debugmodel_tiny", "--training.seq_len", "32",
              "--training.local_batch_size", "2", "--metrics.progress", "off", "--job.dump_folder", str(tmp_path)]
    train([*common, "--training.steps", "1"])
    code = main(["train", *common, "--training.steps", "2", "--model.args.rope_theta", "10000.0"])
    output = capsys.readouterr().err
    assert code == 2 and "holds another model (rope_theta: checkpoint 500000.0, this run 10000.0)" in output
    assert sorted(p.name for p in (tmp_path / "configs").iterdir()) == ["attempt-1.json", "attempt-2.json"]
