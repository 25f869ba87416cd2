"""Bad data in a run: another tokenizer on resume, rows without the text field, a malformed
line deep in a file (stop after saving, or skip and count), a signal during start-up."""
from __future__ import annotations

import json
import logging
import os
import signal

import pytest
import tokenizers
import torch
from tokenizers import models, pre_tokenizers, trainers

from plait.config import DataSection
from plait.data import build_dataloader, build_tokenizer
from plait.data.sources import build_source
from plait.data.tokenizer import Tokenizer
from plait.errors import CheckpointError, ConfigError, DataError
from toy_model import ToyModelPlugin, toy_config, train_toy

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    previous = os.environ.get("PLAIT_CACHE_DIR")
    os.environ["PLAIT_CACHE_DIR"] = str(tmp_path_factory.mktemp("plait-cache"))
    yield build_tokenizer("")
    if previous is None:
        del os.environ["PLAIT_CACHE_DIR"]
    else:
        os.environ["PLAIT_CACHE_DIR"] = previous


def loader(tokenizer, data=None):
    return build_dataloader(data or DataSection(), tokenizer, seq_len=16, local_batch_size=2, dp_rank=0,
                            dp_world_size=1)


def other_tokenizer() -> Tokenizer:
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|end_of_text|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["some other text entirely"] * 20, trainer=trainer)
    return Tokenizer(backend, bos_id=0, eos_id=0, name="other.json")


# ------------------------------------------------------------------------ another tokenizer


def test_resuming_with_another_tokenizer_is_refused_and_the_same_one_elsewhere_is_not(tok, tmp_path):
    first = loader(tok)
    next(first)
    state = first.state_dict()
    assert state["tokenizer"] == {"name": tok.name, "fingerprint": tok.fingerprint}

    with pytest.raises(CheckpointError) as raised:
        loader(other_tokenizer()).load_state_dict(state)
    message = str(raised.value)
    assert f"trained with another tokenizer ({tok.name}, fingerprint {tok.fingerprint})" in message
    assert "(other.json, fingerprint" in message and "--data.tokenizer" in message

    # Another begin/end-of-text token changes what the documents are framed with.
    with pytest.raises(CheckpointError, match="another tokenizer"):
        loader(build_tokenizer("", bos_token="<|end_of_text|>")).load_state_dict(state)

    # The same tokenizer saved elsewhere is the same tokenizer.
    moved = tmp_path / "moved" / "tokenizer.json"
    moved.parent.mkdir()
    tok.backend.save(str(moved))
    same = build_tokenizer(str(moved))
    assert same.name != tok.name and same.fingerprint == tok.fingerprint
    resumed = loader(same)
    resumed.load_state_dict(state)
    assert torch.equal(next(resumed)[0], next(first)[0])

    del state["tokenizer"]  # a checkpoint from before the tokenizer was recorded
    loader(other_tokenizer()).load_state_dict(state)


# ------------------------------------------------------------------------ rows without text


def test_a_row_without_the_text_field_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "one"}\n')
    source = build_source(DataSection(dataset=str(path)))
    skipping = build_source(DataSection(dataset=str(path), bad_rows="skip"))
    with path.open("a") as more:  # past the start-up check, as a row deep in a file would be
        more.write('\n{"text": null}\n{"body": "two", "id": 3}\n{"text": "three"}\n')
    with pytest.raises(DataError) as raised:
        source.open(None).read(10**6)
    message = str(raised.value)
    assert f"line 4 of {path} (byte 32) has no field 'text' (--data.text_field; its fields: body, id)" in message
    assert "--data.bad_rows skip" in message

    assert skipping.open(None).read(10**6) == ["one", "", "three"]  # null is an empty document
    assert skipping.skipped_rows == 1

    with pytest.raises(ConfigError, match=rf"could not be loaded: line 4 of {path} \(byte 32\) has no field"):
        build_source(DataSection(dataset=str(path)))  # within the start: refused before any work


def test_bad_rows_in_the_checked_start_are_config_errors_or_skipped(tok, tmp_path):
    path = tmp_path / "start.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"\n[3]\n' + json.dumps({"text": "four " * 100}) + "\n")
    with pytest.raises(ConfigError, match=rf"line 2 of {path} \(byte 16\) is not valid JSON"):
        loader(tok, DataSection(dataset=str(path)))
    skipping = loader(tok, DataSection(dataset=str(path), bad_rows="skip"))
    assert skipping.skipped_rows == 0  # the start-up check counts nothing
    next(skipping)
    assert skipping.skipped_rows == 2


# ------------------------------------------------------------------------ a bad line deep in a file


def _corpus(path, *, bad_line: int | None, lines: int = 120) -> None:
    rows = []
    for i in range(lines):
        text = " ".join(f"word{(i * 7 + j) % 97} item{j % 13}" for j in range(60))
        rows.append('{"text": "broken' if i == bad_line else json.dumps({"text": text}))
    path.write_text("\n".join(rows) + "\n")


def _data_run(folder, data_file, *, steps: int, **data):
    config = toy_config(folder, steps=steps, seq_len=256, local_batch_size=20)  # a chunk read lasts 2-3 steps
    config.data.dataset = str(data_file)
    config.checkpoint.interval = 100
    for name, value in data.items():
        setattr(config.data, name, value)
    return config


@pytest.fixture(scope="module")
def deep_corpus(tmp_path_factory):
    """A corpus whose line 91 (past the start-up check) is malformed, the same one fixed,
    and the losses of an uninterrupted run over the fixed one."""
    folder = tmp_path_factory.mktemp("deep")
    fixed = folder / "fixed.jsonl"
    _corpus(fixed, bad_line=None)
    _, reference = train_toy(_data_run(folder / "reference", fixed, steps=6), ToyModelPlugin())
    return folder, fixed, reference.losses


def test_a_bad_line_deep_in_a_file_stops_after_saving_and_the_fixed_data_resumes_exactly(deep_corpus, tmp_path):
    folder, fixed, reference = deep_corpus
    data_file = tmp_path / "data.jsonl"
    _corpus(data_file, bad_line=90)
    assert data_file.read_text().index("broken") > 1 << 16  # past what start-up checks

    with pytest.raises(DataError) as raised:
        train_toy(_data_run(tmp_path / "run", data_file, steps=6), ToyModelPlugin())
    message = str(raised.value)
    failed = int(message.split(":")[0].removeprefix("step "))
    assert 2 <= failed <= 6
    assert f"line 91 of {data_file}" in message and "is not valid JSON" in message
    assert f"checkpoint step {failed - 1} is saved; resume with the same command once the data is fixed" in message
    assert sorted(os.listdir(tmp_path / "run" / "checkpoint")) == [".lock", f"step-{failed - 1}"]

    data_file.write_text(fixed.read_text())  # the user fixes the line
    trainer, resumed = train_toy(_data_run(tmp_path / "run", data_file, steps=6), ToyModelPlugin())
    assert trainer.resumed_from == failed - 1
    assert resumed.losses == {step: reference[step] for step in range(failed, 7)}  # bit for bit


def test_bad_rows_skip_trains_on_and_counts_them(deep_corpus, tmp_path, caplog):
    data_file = tmp_path / "data.jsonl"
    _corpus(data_file, bad_line=90)
    with caplog.at_level(logging.WARNING, logger="plait"):
        trainer, result = train_toy(_data_run(tmp_path / "run", data_file, steps=6, bad_rows="skip"),
                                    ToyModelPlugin())
    assert result.last_step == 6 and trainer.dataloader.skipped_rows == 1
    assert f"skipping line 91 of {data_file}: is not valid JSON" in caplog.text


# ------------------------------------------------------------------------ a signal during start-up


TOY_AS_INSTALLED = """
from plait import hookimpl
from toy_model import TOY_SPEC
PLAIT_API_VERSION = 1
PROVIDES = ("model:hooktoy",)
@hookimpl
def plait_register_models(register):
    register(TOY_SPEC)
"""


@pytest.fixture
def fresh_cli_logging():
    """``plait train`` gives the plait logger a handler on the stdout of its time (this
    test's captured one): drop it afterwards, for the next in-process run."""
    plait_logger = logging.getLogger("plait")
    handlers = list(plait_logger.handlers)
    yield
    plait_logger.handlers[:] = handlers


@pytest.mark.usefixtures("fresh_cli_logging")
@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_start_up_ends_with_a_message_and_status(tmp_path, monkeypatch, capsys, make_plugin,
                                                                 signum, status):
    """Through the CLI: the toy model as an installed plugin, the signal sent while the
    trainer is being built (before the training loop takes the signals over)."""
    import plait.train
    from plait.cli import main

    make_plugin("signaltoy", TOY_AS_INSTALLED)
    before = signal.getsignal(signal.SIGTERM)

    def signal_during_start_up(*args):
        os.kill(os.getpid(), signum)

    monkeypatch.setattr(plait.train, "check_memory_fits", signal_during_start_up)
    code = main(["train", "--model", "hooktoy", "--model.flavor", "tiny", "--plugins", "signaltoy",
                 "--job.dump_folder", str(tmp_path), "--metrics.progress", "off"])
    captured = capsys.readouterr()
    assert code == status, captured.err
    name = signal.Signals(signum).name
    assert f"plait: error: stopped by {name} before the run could finish" in captured.err
    assert "Traceback" not in captured.err + captured.out
    assert (tmp_path / "checkpoint" / ".lock").read_text() == ""  # released
    assert signal.getsignal(signal.SIGTERM) is before
