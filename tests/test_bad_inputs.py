"""Every input the user controls, given bad values, through `plait` itself (in-process):
exit status 2 (config) or 1 (runtime), one message, no traceback, nothing half-written.

The table covers HF ``config.json`` files, environment variables, option values, files
and folders, and `plait convert`'s output folder; ``tests/test_cli_errors.py`` holds the
earlier ones (unknown options, plugins, recipes, WORLD_SIZE, compile backend, run folders)."""
from __future__ import annotations

import errno
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from plait.cli import main

from e2e_helpers import tiny_job

GOOD_HF = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 2048, "intermediate_size": 128}


@dataclass
class Bad:
    argv: list[str]
    expected: str
    code: int = 2
    env: dict[str, str] = field(default_factory=dict)
    files: dict[str, bytes | str] = field(default_factory=dict)
    """Written under the test's folder before the run (``{tmp}`` in argv is that folder)."""


def hf(config: object) -> dict[str, bytes | str]:
    return {"hf/config.json": config if isinstance(config, (str, bytes)) else json.dumps(config)}


TWO_RANKS = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "localhost"}
HF_DIR = ["--model.hf_dir", "{tmp}/hf", "--model.flavor", ""]
BINARY = bytes(range(256)) * 8

CASES = {
    # An HF config.json, read by the shared path (plait.hf) for every model.
    "hf_binary": Bad(HF_DIR, "config.json is not text (a binary file?)", files=hf(b"\xff\xfe\x00\x01" * 8)),
    "hf_not_json": Bad(HF_DIR, "config.json is not valid JSON", files=hf("{hidden_size: 64")),
    "hf_not_an_object": Bad(HF_DIR, "config.json must hold a JSON object", files=hf("[64, 2]")),
    "hf_string_size": Bad(HF_DIR, "hidden_size must be a positive integer, got '64'",
                          files=hf({**GOOD_HF, "hidden_size": "64"})),
    "hf_zero_heads": Bad(HF_DIR, "num_attention_heads must be a positive integer, got 0",
                         files=hf({**GOOD_HF, "num_attention_heads": 0})),
    "hf_negative_layers": Bad(HF_DIR, "num_hidden_layers must be a positive integer, got -2",
                              files=hf({**GOOD_HF, "num_hidden_layers": -2})),
    "hf_zero_vocab": Bad(HF_DIR, "vocab_size must be a positive integer, got 0",
                         files=hf({**GOOD_HF, "vocab_size": 0})),
    "hf_fractional_size": Bad(HF_DIR, "intermediate_size must be a positive integer, got 127.5",
                              files=hf({**GOOD_HF, "intermediate_size": 127.5})),
    "hf_boolean_size": Bad(HF_DIR, "num_hidden_layers must be a positive integer, got True",
                           files=hf({**GOOD_HF, "num_hidden_layers": True})),
    "hf_heads_do_not_divide_hidden": Bad(HF_DIR, "dim (66) must be divisible by n_heads (4)",
                                         files=hf({**GOOD_HF, "hidden_size": 66})),
    "hf_kv_heads_do_not_divide_heads": Bad(
        HF_DIR, "num_attention_heads (4) must be a multiple of num_key_value_heads (3)",
        files=hf({**GOOD_HF, "num_key_value_heads": 3})),
    "hf_missing_key": Bad(HF_DIR, "config.json lacks vocab_size",
                          files=hf({k: v for k, v in GOOD_HF.items() if k != "vocab_size"})),
    "hf_architectures_not_a_list": Bad(HF_DIR, "architectures must be a list of class names",
                                       files=hf({**GOOD_HF, "architectures": "LlamaForCausalLM"})),
    "hf_other_architecture": Bad(HF_DIR, "holds a BertModel checkpoint",
                                 files=hf({**GOOD_HF, "architectures": ["BertModel"]})),
    # Environment variables.
    "env_rank_not_a_number": Bad([], "RANK must be an integer >= 0 below WORLD_SIZE (1)", env={"RANK": "x"}),
    "env_rank_past_world_size": Bad([], "RANK must be an integer >= 0 below WORLD_SIZE (1)", env={"RANK": "3"}),
    "env_peak_flops_text": Bad([], "PLAIT_PEAK_FLOPS must be a device's peak FLOP/s", env={"PLAIT_PEAK_FLOPS": "fast"}),
    "env_peak_flops_negative": Bad([], "got '-1e12'", env={"PLAIT_PEAK_FLOPS": "-1e12"}),
    "env_peak_flops_infinite": Bad([], "got 'inf'", env={"PLAIT_PEAK_FLOPS": "inf"}),
    "env_master_port_text": Bad(["--plugins", "fsdp"], "MASTER_PORT must be a port number (1-65535), got 'abc'",
                                env={**TWO_RANKS, "MASTER_PORT": "abc"}),
    "env_master_port_out_of_range": Bad(["--plugins", "fsdp"], "got '70000'",
                                        env={**TWO_RANKS, "MASTER_PORT": "70000"}),
    "env_load_plugins_excludes_the_model": Bad([], "registers no plugin", env={"PLAIT_LOAD_PLUGINS": "nothing"}),
    # Model args from the command line.
    "args_zero_heads": Bad(["--model.args.n_heads", "0"], "--model.args: integer modulo by zero"),
    "args_negative_dim": Bad(["--model.args.dim", "-4", "--model.args.n_heads", "2"],
                             "cannot be built with --model.args.dim -4, --model.args.n_heads 2"),
    "args_zero_vocab": Bad(["--model.args.vocab_size", "0"], "vocabulary of 0"),
    # Sizes that cannot fit, refused before anything is allocated.
    "seq_len_beyond_memory": Bad(["--training.seq_len", "50000000"], "cannot fit: a step needs at least"),
    "batch_beyond_memory": Bad(["--training.local_batch_size", "100000000"], "cannot fit: a step needs at least"),
    # Files and folders.
    "config_binary": Bad(["--config", "{tmp}/config.bin"], "is not text (a binary file?)",
                         files={"config.bin": b"\xff\xfe\x00" * 10}),
    "dataset_binary": Bad(["--data.dataset", "{tmp}/data.jsonl"], "line 1 of", files={"data.jsonl": BINARY}),
    "dataset_row_without_text": Bad(["--data.dataset", "{tmp}/data.jsonl"], "line 2 of",
                                    files={"data.jsonl": '{"text": "a"}\n{"body": "b"}\n'}),
    "tokenizer_binary": Bad(["--data.tokenizer", "{tmp}/tok.json"], "is not a valid Hugging Face tokenizers file",
                            files={"tok.json": BINARY}),
    "tensorboard_under_a_file": Bad(["--metrics.tensorboard_folder", "{tmp}/afile/tb"],
                                    "--metrics.tensorboard_folder", files={"afile": "x"}),
    "dump_folder_dev_null": Bad(["--job.dump_folder", "/dev/null"], "is a file, not a folder"),
}


@pytest.fixture
def fresh_cli_logging():
    """``plait train`` gives the plait logger a handler on this test's captured stdout."""
    plait_logger = logging.getLogger("plait")
    handlers = list(plait_logger.handlers)
    yield
    plait_logger.handlers[:] = handlers


def run(argv, capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_clean_message(code: int, expected_code: int, out: str, err: str, expected: str) -> None:
    assert code == expected_code, err
    assert "Traceback" not in out + err
    errors = [line for line in err.splitlines() if line.startswith("plait: error:")]
    assert len(errors) == 1 and expected in errors[0], err


@pytest.mark.usefixtures("fresh_cli_logging")
@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_ends_with_one_message(name, tmp_path, capsys, monkeypatch):
    case = CASES[name]
    for relative, content in case.files.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    run_dir = tmp_path / "run"
    argv = ["train", *tiny_job(run_dir, steps=1), *[arg.format(tmp=tmp_path) for arg in case.argv]]
    code, out, err = run(argv, capsys)
    assert_one_clean_message(code, case.code, out, err, case.expected)
    # Nothing half-written: no checkpoint, no metrics; at most the run's config and lock.
    written = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")) if run_dir.is_dir() else []
    assert set(written) <= {"config.json", "configs", "configs/attempt-1.json", "checkpoint", "checkpoint/.lock",
                            "tb"}, written


# ------------------------------------------------------------------------ plait convert's output folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    plait_logger = logging.getLogger("plait")
    handlers = list(plait_logger.handlers)
    assert main(["train", *tiny_job(run_dir, "--metrics.enable_tensorboard", "False", steps=1)]) == 0
    plait_logger.handlers[:] = handlers
    return run_dir / "checkpoint" / "step-1"


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[1]) if len(args) > 1 else None)


def _read_only(*args, dir=None, **kwargs):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), dir)


@pytest.mark.parametrize("problem, code, expected", [
    ("under_a_file", 2, "is a file, not a folder"),
    ("not_empty", 2, "already exists and is not an empty folder"),
    ("read_only", 2, "no permission to write"),
    ("disk_full", 1, "the disk is full"),
])
def test_convert_output_that_cannot_be_written_leaves_nothing(checkpoint, tmp_path, capsys, monkeypatch, problem,
                                                              code, expected):
    output = tmp_path / "hf_out"
    if problem == "under_a_file":
        (tmp_path / "afile").write_text("x")
        output = tmp_path / "afile" / "hf_out"
    elif problem == "not_empty":
        output.mkdir()
        (output / "old.safetensors").write_text("x")
    elif problem == "read_only":
        import tempfile

        monkeypatch.setattr(tempfile, "NamedTemporaryFile", _read_only)
    else:
        import safetensors.torch

        monkeypatch.setattr(safetensors.torch, "save_file", _disk_full)
    before = sorted(p.name for p in tmp_path.iterdir())
    code_, out, err = run(["convert", str(checkpoint), str(output)], capsys)
    assert_one_clean_message(code_, code, out, err, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no staging folder left
    if problem == "not_empty":
        assert [p.name for p in output.iterdir()] == ["old.safetensors"]


def test_convert_writes_the_whole_folder_at_once(checkpoint, tmp_path, capsys):
    output = tmp_path / "hf_out"
    code, out, err = run(["convert", str(checkpoint), str(output)], capsys)
    assert code == 0, err
    assert (output / "model.safetensors").is_file() and (output / "tokenizer.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf_out"]
