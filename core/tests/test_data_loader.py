import json

import pytest
import torch

from plait.config import DataSection
from plait.data import build_dataloader, build_tokenizer
from plait.errors import ConfigError

SEQ = 32


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer("")


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def loader(tok, data, *, rank=0, world=1, batch=4):
    return build_dataloader(data, tok, seq_len=SEQ, local_batch_size=batch, dp_rank=rank, dp_world_size=world)


def small_corpus(tmp_path):
    """Six short documents: an epoch is a few batches, so tests cross epoch boundaries."""
    return [f"document {i}: " + " ".join(f"word{j}" for j in range(5 + 7 * i)) for i in range(6)]


def write(tmp_path, kind, docs):
    if kind == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "d.parquet"
        pq.write_table(pa.table({"text": docs}), path)
    else:
        path = tmp_path / "d.txt"  # the text builder: one document per line
        path.write_text("\n".join(d.replace("\n", " ") for d in docs) + "\n")
    return str(path)


def assert_resumes_exactly(tok, data, *, split_at, total):
    reference = take(loader(tok, data), total)
    first = loader(tok, data)
    iterator = iter(first)
    for _ in range(split_at):
        next(iterator)
    state = json.loads(json.dumps(first.state_dict()))  # must survive JSON
    resumed = loader(tok, data)
    resumed.load_state_dict(state)
    for expected, got in zip(reference[split_at:], take(resumed, total - split_at)):
        assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])
    return reference, state


def test_windows_are_shifted_packed_documents(tok):
    inputs, labels = take(loader(tok, DataSection()), 1)[0]
    assert inputs.shape == labels.shape == (4, SEQ) and inputs.dtype == torch.long
    assert torch.equal(inputs[:, 1:], labels[:, :-1])
    assert inputs[0, 0].item() == tok.bos_id  # the stream starts with a document


def test_embedded_resume_mid_document(tok):
    _, state = assert_resumes_exactly(tok, DataSection(), split_at=7, total=15)
    assert state["offset"] > 0


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "txt"])
@pytest.mark.parametrize("streaming", [True, False])
def test_local_files_resume_across_epochs(tok, tmp_path, kind, streaming):
    data = DataSection(dataset=write(tmp_path, kind, small_corpus(tmp_path)), streaming=streaming)
    reference, state = assert_resumes_exactly(tok, data, split_at=5, total=12)
    later = loader(tok, data)
    for _ in zip(range(12), later):
        pass
    assert later.state_dict()["epoch"] >= 1  # the run wrapped around the data


def test_streaming_and_not_give_the_same_batches(tok, tmp_path):
    path = write(tmp_path, "jsonl", small_corpus(tmp_path))
    a = take(loader(tok, DataSection(dataset=path, streaming=True)), 6)
    b = take(loader(tok, DataSection(dataset=path, streaming=False)), 6)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))


def test_global_batch_is_layout_independent_and_state_is_shared(tok):
    whole = take(loader(tok, DataSection(), batch=4), 5)
    ranks = [loader(tok, DataSection(), rank=r, world=2, batch=2) for r in range(2)]
    iterators = [iter(r) for r in ranks]
    for step in range(5):
        parts = [next(it)[0] for it in iterators]
        assert torch.equal(torch.cat(parts), whole[step][0])
    assert ranks[0].state_dict() == ranks[1].state_dict()
    # the shared state resumes a run with another layout
    single = loader(tok, DataSection(), batch=4)
    single.load_state_dict(ranks[1].state_dict())
    expected = take(loader(tok, DataSection(), batch=4), 7)[5]
    assert torch.equal(take(single, 1)[0][0], expected[0])


def test_missing_text_field_lists_columns(tok, tmp_path):
    path = write(tmp_path, "jsonl", small_corpus(tmp_path))
    with pytest.raises(ConfigError, match="has no column 'body'; its columns are text, id"):
        loader(tok, DataSection(dataset=path, text_field="body", streaming=False))


def test_unknown_dataset_name_explains(tok, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="is not a local file or folder"):
        loader(tok, DataSection(dataset="no-such-org/no-such-dataset"))


def test_mixed_file_kinds_refused(tok, tmp_path):
    a = write(tmp_path, "jsonl", small_corpus(tmp_path))
    b = write(tmp_path, "txt", small_corpus(tmp_path))
    with pytest.raises(ConfigError, match="all files must be of one kind"):
        loader(tok, DataSection(dataset=f"{a},{b}"))
