"""`plait generate` end to end: a run trained for 2 steps (with samples logged during
training), its checkpoint, the HF folder `plait convert` writes, and bad inputs."""
from __future__ import annotations

import logging

import pytest
import torch

import plait
from plait.cli import main, train

from e2e_helpers import tiny_job


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny llama3 run of 2 steps with greedy samples after each, and the same run without."""
    folder = tmp_path_factory.mktemp("generate")
    logger = logging.getLogger("plait")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        sampled = train(tiny_job(folder / "run", "--checkpoint.interval", "2", "--training.sample_interval", "1",
                                 "--training.sample_max_new_tokens", "6", "--metrics.enable_tensorboard", "True",
                                 steps=2))  # fmt: skip
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    plain = train(tiny_job(folder / "plain", "--checkpoint.enable", "False", steps=2))
    return folder, sampled, plain, records


def test_samples_during_training_leave_the_losses_and_reach_the_console_and_tensorboard(run):
    folder, sampled, plain, records = run
    assert sampled.losses == plain.losses
    lines = [line for line in records if "  samples:" in line]
    assert [line.split()[1] for line in lines] == ["1", "2"] and "'The meaning of life is' -> " in lines[0]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((folder / "run").rglob("events.out.tfevents.*")).parent),
                              size_guidance={"tensors": 0})  # fmt: skip
    events.Reload()
    texts = events.Tensors("samples/text_summary")
    assert [t.step for t in texts] == [1, 2] and b"The meaning of life is" in texts[0].tensor_proto.string_val[0]


def test_generate_from_a_checkpoint_and_from_the_converted_hf_folder(run, capsys):
    folder = run[0]
    checkpoint = str(folder / "run" / "checkpoint" / "step-2")
    argv = ["--prompt", "Once upon a time", "--prompt", "The", "--max_new_tokens", "8"]
    assert main(["generate", "--checkpoint", checkpoint, *argv]) == 0
    from_checkpoint = capsys.readouterr().out
    assert "--- 1: Once upon a time" in from_checkpoint and "--- 2: The" in from_checkpoint
    assert "tokens (greedy)" in from_checkpoint and "tokens/s on cpu" in from_checkpoint
    assert main(["convert", checkpoint, str(folder / "hf")]) == 0
    capsys.readouterr()
    assert main(["generate", "--hf_dir", str(folder / "hf"), *argv]) == 0
    from_hf = capsys.readouterr().out
    continuations = [line for line in from_checkpoint.splitlines() if not line.startswith(("---", "llama3"))]
    assert continuations == [line for line in from_hf.splitlines() if not line.startswith(("---", "llama3"))]
    # sampling: the same seed gives the same text, through the CLI too
    sampled = [["generate", "--hf_dir", str(folder / "hf"), *argv, "--temperature", "1.5", "--top_k", "50",
                "--seed", str(seed)] for seed in (1, 1)]  # fmt: skip
    texts = []
    for command in sampled:
        assert main(command) == 0
        texts.append([line for line in capsys.readouterr().out.splitlines() if not line.startswith("llama3")])
    assert texts[0] == texts[1] and "(sampled)" not in texts[0][-1]


def test_the_python_api_on_the_converted_folder_matches_the_cli_tokens(run):
    folder = run[0]
    model = plait.from_pretrained("llama3", str(folder / "hf"))
    tokens = torch.randint(0, 2048, (2, 5), generator=torch.Generator().manual_seed(0))
    cached = plait.generate(model, tokens, max_new_tokens=6)
    assert cached.shape == (2, 11) and torch.equal(cached, plait.generate(model, tokens, max_new_tokens=6,
                                                                          use_cache=False))  # fmt: skip


@pytest.mark.parametrize(("extra", "message"), [
    ([], "no prompt: pass --prompt"),
    (["--prompt", "a", "--top_p", "0"], r"--top-p must be in \(0, 1\]"),
    (["--prompt", "a", "--top_p", "1.5"], r"--top-p must be in \(0, 1\]"),
    (["--prompt", "a", "--temperature", "-1"], "--temperature must be >= 0"),
    (["--prompt", "a", "--max_new_tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--prompt", "a", "--device", "cuda:7"] if not torch.cuda.is_available() else ["--prompt", "a", "--device",
     "nodevice"], "--device"),
    (["--prompt", " ".join(str(i) for i in range(1100))], "exceeds the model.s maximum length 2048: shorten the prompt"),
    (["--prompt", "a", "--prompt_file", "/nonexistent/prompts.txt"], "--prompt-file /nonexistent/prompts.txt"),
])  # fmt: skip
def test_bad_input_is_one_message_and_status_2(run, capsys, extra, message):
    checkpoint = str(run[0] / "run" / "checkpoint" / "step-2")
    assert main(["generate", "--checkpoint", checkpoint, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("plait: error: ") and len(err.strip().splitlines()) == 1, err
    import re

    assert re.search(message, err), err


def test_bad_sources_are_one_message_and_status_2(run, tmp_path, capsys):
    folder = run[0]
    (tmp_path / "hf").mkdir()
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "hf" / name).write_bytes((folder / "hf" / name).read_bytes())
    cases = [
        (["--prompt", "a"], "pass exactly one of --checkpoint"),
        (["--checkpoint", str(tmp_path / "missing"), "--prompt", "a"], "is not a folder"),
        (["--checkpoint", str(folder / "run"), "--hf_dir", str(folder / "hf"), "--prompt", "a"], "exactly one"),
        (["--hf_dir", str(tmp_path / "hf"), "--prompt", "a"], "no tokenizer: --hf-dir .* holds no tokenizer.json"),
    ]
    for extra, message in cases:
        assert main(["generate", *extra]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1
        import re

        assert re.search(message, err), err
