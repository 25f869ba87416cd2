import json
import os
import subprocess
import sys
import textwrap

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, trainers

from plait.data import Tokenizer, build_tokenizer
from plait.data import embedded
from plait.data.embedded import (
    BOS_TOKEN,
    EMBEDDED_VOCAB_SIZE,
    EOS_TOKEN,
    embedded_corpus,
    embedded_tokenizer_path,
    train_embedded_tokenizer,
)
from plait.errors import ConfigError


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A private cache for this module, so that the build path is exercised."""
    path = tmp_path_factory.mktemp("plait-cache")
    previous = os.environ.get("PLAIT_CACHE_DIR")
    os.environ["PLAIT_CACHE_DIR"] = str(path)
    yield path
    if previous is None:
        del os.environ["PLAIT_CACHE_DIR"]
    else:
        os.environ["PLAIT_CACHE_DIR"] = previous


@pytest.fixture(scope="module")
def tok(cache_dir) -> Tokenizer:
    return build_tokenizer("")


def test_embedded_tokenizer_shape(tok):
    assert tok.vocab_size == EMBEDDED_VOCAB_SIZE == 2048
    assert tok.backend.get_vocab_size(with_added_tokens=True) == 2048
    assert tok.bos_id == tok.backend.token_to_id(BOS_TOKEN)
    assert tok.eos_id == tok.backend.token_to_id(EOS_TOKEN)
    assert tok.bos_id != tok.eos_id


@pytest.mark.parametrize(
    "text",
    ["def f(x):\n    return x + 1\n", "naïve café — 日本語 🙂\t\r\n", "", "   leading spaces"],
)
def test_roundtrip_is_lossless(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_encode_adds_no_special_tokens_and_treats_their_text_as_text(tok):
    ids = tok.encode(f"x {EOS_TOKEN} y {BOS_TOKEN}")
    assert tok.bos_id not in ids and tok.eos_id not in ids
    assert tok.decode(ids) == f"x {EOS_TOKEN} y {BOS_TOKEN}"
    assert tok.decode([tok.bos_id, *tok.encode("a"), tok.eos_id]) == f"{BOS_TOKEN}a{EOS_TOKEN}"


def test_encode_batch_matches_encode(tok):
    texts = list(embedded_corpus().documents[:5]) + ["", "tail"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_compresses_python_source(tok):
    # a BPE trained on Python code packs several characters per token
    document = embedded_corpus().documents[0]
    assert len(document) / len(tok.encode(document)) > 2.5


def test_training_is_deterministic_and_matches_the_cache(tok, cache_dir):
    documents = embedded_corpus().documents
    first, second = train_embedded_tokenizer(documents), train_embedded_tokenizer(documents)
    assert first == second
    cached = embedded_tokenizer_path()
    assert cached.parent.parent == cache_dir and f"py{sys.version_info.major}{sys.version_info.minor}" in cached.name
    assert cached.read_text(encoding="utf-8") == first
    assert tokenizers.Tokenizer.from_str(first).get_vocab() == tok.backend.get_vocab()


def test_cached_tokenizer_is_reused_and_damage_is_repaired(tok, monkeypatch):
    path = embedded_tokenizer_path()
    good = path.read_text(encoding="utf-8")

    def must_not_train(documents):
        raise AssertionError("the cached tokenizer should have been used")

    monkeypatch.setattr(embedded, "train_embedded_tokenizer", must_not_train)
    assert build_tokenizer("").encode("import os") == tok.encode("import os")

    monkeypatch.undo()
    path.write_text(good[: len(good) // 2], encoding="utf-8")  # a truncated file
    assert build_tokenizer("").encode("import os") == tok.encode("import os")
    assert path.read_text(encoding="utf-8") == good


def test_concurrent_builds_share_one_cache_entry(tmp_path):
    """Processes starting at once (ranks) each build and rename atomically: no torn file."""
    script = textwrap.dedent(
        """
        import sys
        from plait.data import build_tokenizer
        tok = build_tokenizer("")
        print(tok.vocab_size, tok.encode("for i in range(10):"))
        """
    )
    env = {**os.environ, "PLAIT_CACHE_DIR": str(tmp_path)}
    processes = [
        subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=60)[0] for p in processes]
    assert all(p.returncode == 0 for p in processes)
    assert len(set(outputs)) == 1 and outputs[0].startswith("2048 ")
    files = sorted(p.name for p in (tmp_path / "tokenizers").iterdir())
    assert len(files) == 1 and files[0].startswith("embedded-") and files[0].endswith(".json")


# ----------------------------------------------------------------- tokenizer files


def small_tokenizer(special: list[str]) -> tokenizers.Tokenizer:
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(["hello world, hello tokens"] * 20, trainer=trainer)
    return backend


def test_loads_a_file_or_a_folder(tok, tmp_path):
    file = tmp_path / "tokenizer.json"
    file.write_text(tok.backend.to_str(), encoding="utf-8")
    for path in (str(file), str(tmp_path)):
        loaded = build_tokenizer(path)
        assert (loaded.vocab_size, loaded.bos_id, loaded.eos_id) == (tok.vocab_size, tok.bos_id, tok.eos_id)
        assert loaded.encode("while True: pass") == tok.encode("while True: pass")


@pytest.mark.parametrize(
    ("special", "bos", "eos"),
    [
        (["<s>", "</s>", "<unk>"], "<s>", "</s>"),
        (["<bos>", "<eos>"], "<bos>", "<eos>"),
        (["<|endoftext|>"], "<|endoftext|>", "<|endoftext|>"),  # no bos: documents split by eos
    ],
)
def test_common_special_token_names(tmp_path, special, bos, eos):
    backend = small_tokenizer(special)
    backend.save(str(tmp_path / "tokenizer.json"))
    loaded = build_tokenizer(str(tmp_path))
    assert loaded.bos_id == backend.token_to_id(bos)
    assert loaded.eos_id == backend.token_to_id(eos)


def test_tokenizer_config_names_the_special_tokens(tmp_path):
    backend = small_tokenizer(["<s>", "</s>", "<|im_end|>", "<|im_start|>"])
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>"})
    )
    loaded = build_tokenizer(str(tmp_path))
    assert loaded.bos_id == backend.token_to_id("<|im_start|>")
    assert loaded.eos_id == backend.token_to_id("<|im_end|>")


def test_special_tokens_map_and_command_line_overrides(tmp_path):
    backend = small_tokenizer(["<|im_end|>", "<|im_start|>", "<pad>"])
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}}))
    loaded = build_tokenizer(str(tmp_path))
    assert loaded.eos_id == loaded.bos_id == backend.token_to_id("<|im_end|>")  # no bos: eos separates
    chosen = build_tokenizer(str(tmp_path), bos_token="<|im_start|>", eos_token="<pad>")
    assert (chosen.bos_id, chosen.eos_id) == (backend.token_to_id("<|im_start|>"), backend.token_to_id("<pad>"))
    with pytest.raises(ConfigError, match=r"--data.eos_token '</s>': tokenizer .* has no such token.*<\|im_end\|>"):
        build_tokenizer(str(tmp_path), eos_token="</s>")


def test_the_embedded_tokenizer_takes_overrides_too(tok):
    token = tok.backend.id_to_token(tok.eos_id)
    assert build_tokenizer("", bos_token=token).bos_id == tok.eos_id


def test_tokenizer_without_eos_is_refused(tmp_path):
    small_tokenizer(["<pad>"]).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ConfigError, match=r"no end-of-text token .*special tokens are \['<pad>'\].*--data.eos_token"):
        build_tokenizer(str(tmp_path / "tokenizer.json"))


def test_bad_tokenizer_paths_explain_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="no such file or folder.*leave --data.tokenizer empty"):
        build_tokenizer(str(tmp_path / "missing.json"))
    (tmp_path / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(ConfigError, match="holds no tokenizer.json.*sentencepiece.*save_pretrained"):
        build_tokenizer(str(tmp_path))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match="not a valid Hugging Face tokenizers file"):
        build_tokenizer(str(broken))
