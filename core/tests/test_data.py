import json
import os
import subprocess
import sys
import time

import datasets
import huggingface_hub.constants
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from plait.config import DataSection
from plait.data import TokenLoader, build_dataloader, build_tokenizer
from plait.data.embedded import embedded_corpus
from plait.data.sources import build_source
from plait.errors import CheckpointError, ConfigError, PlaitError

SEQ = 16


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    previous = os.environ.get("PLAIT_CACHE_DIR")
    os.environ["PLAIT_CACHE_DIR"] = str(tmp_path_factory.mktemp("plait-cache"))
    yield build_tokenizer("")
    if previous is None:
        del os.environ["PLAIT_CACHE_DIR"]
    else:
        os.environ["PLAIT_CACHE_DIR"] = previous


@pytest.fixture(autouse=True)
def private_hf_cache(tmp_path, monkeypatch):
    """Non-streaming datasets write Arrow caches; keep them out of the home folder, and
    make hub look-ups fail at once instead of retrying a network that is not there."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


# Documents of very different lengths (some much longer than a window), one empty.
DOCS = [
    "alpha",
    "def long_function(argument):\n" + "    value = argument * 2 + 1\n" * 12,
    "",
    "beta gamma delta",
    "The quick brown fox jumps over the lazy dog. " * 4,
    "x",
    "import os\nprint(os.getcwd())",
]


def write(folder, kind, docs=DOCS, name="docs"):
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "jsonl":
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)))
    elif kind == "parquet":
        path = folder / f"{name}.parquet"
        pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), path, row_group_size=3)
    else:  # the text builder reads one document per line
        path = folder / f"{name}.txt"
        path.write_text("\n".join(d.replace("\n", " ") for d in docs) + "\n")
    return str(path)


def docs_as_read(kind, docs=DOCS):
    return [d.replace("\n", " ") for d in docs] if kind == "txt" else docs


def stream_of(tok, docs):
    """The packed token stream of one epoch, built independently of the loader."""
    return [t for d in docs if d for t in [tok.bos_id, *tok.encode(d), tok.eos_id]]


def make_loader(tok, data, *, batch=4, rank=0, world=1, seq=SEQ, chunk_chars=None):
    if chunk_chars is None:
        return build_dataloader(data, tok, seq_len=seq, local_batch_size=batch, dp_rank=rank, dp_world_size=world)
    return TokenLoader(
        build_source(data), tok, seq_len=seq, local_batch_size=batch, dp_rank=rank, dp_world_size=world,
        chunk_chars=chunk_chars,
    )


def take(loader, n):
    return [next(loader) for _ in range(n)]


def assert_same_batches(expected, got):
    assert len(expected) == len(got)
    for (x1, y1), (x2, y2) in zip(expected, got):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def json_roundtrip(state):
    text = json.dumps(state)
    assert len(text) < 2000  # positions only, never data
    return json.loads(text)


# ----------------------------------------------------------------------------- packing


def test_embedded_batches_are_windows_of_the_packed_documents(tok):
    loader = make_loader(tok, DataSection(), batch=4)
    batches = take(loader, 3)
    window = SEQ + 1
    needed = 3 * 4 * window
    stream = []
    for document in embedded_corpus().documents:
        stream += [tok.bos_id, *tok.encode(document), tok.eos_id]
        if len(stream) >= needed:
            break
    expected = torch.tensor(stream[:needed]).view(3, 4, window)
    for (inputs, labels), rows in zip(batches, expected):
        assert inputs.dtype == labels.dtype == torch.long
        assert inputs.shape == labels.shape == (4, SEQ)
        assert torch.equal(inputs, rows[:, :-1]) and torch.equal(labels, rows[:, 1:])


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "txt"])
@pytest.mark.parametrize("streaming", [True, False])
def test_local_files_pack_the_documents_epoch_after_epoch(tok, tmp_path, kind, streaming):
    data = DataSection(dataset=write(tmp_path, kind), streaming=streaming)
    loader = make_loader(tok, data, batch=3)
    epoch = stream_of(tok, docs_as_read(kind))
    batches = take(loader, 3 * len(epoch) // (3 * (SEQ + 1)) + 1)  # a bit over three epochs
    got = torch.cat([torch.cat([x, y[:, -1:]], dim=1) for x, y in batches]).flatten().tolist()
    assert got == (epoch * 4)[: len(got)]
    assert loader.state_dict()["epoch"] == 3


# --------------------------------------------------------------------------- resuming


def assert_resumes_exactly(tok, data, *, total, chunk_chars=None, batch=4):
    """Resume from the state saved after every batch; a resumed loader's own state
    (equivalent, though its chunks may start elsewhere) resumes exactly too."""
    reference = make_loader(tok, data, batch=batch, chunk_chars=chunk_chars)
    states = [json_roundtrip(reference.state_dict())]
    batches = []
    for _ in range(total + 2):
        batches.append(next(reference))
        states.append(json_roundtrip(reference.state_dict()))
    for k in range(total):
        resumed = make_loader(tok, data, batch=batch, chunk_chars=chunk_chars)
        resumed.load_state_dict(states[k])
        assert resumed.state_dict() == states[k]
        assert_same_batches(batches[k:total], take(resumed, total - k))
        if k in (1, total // 2):
            again = make_loader(tok, data, batch=batch, chunk_chars=chunk_chars)
            again.load_state_dict(json_roundtrip(resumed.state_dict()))
            assert_same_batches(batches[total:], take(again, 2))
    return states[: total + 1]


@pytest.mark.parametrize("chunk_chars", [None, 40])
@pytest.mark.parametrize("kind", ["jsonl", "parquet", "txt"])
@pytest.mark.parametrize("streaming", [True, False])
def test_local_files_resume_exactly(tok, tmp_path, kind, streaming, chunk_chars):
    data = DataSection(dataset=write(tmp_path, kind), streaming=streaming)
    states = assert_resumes_exactly(tok, data, total=12, chunk_chars=chunk_chars)
    # the saved positions cover mid-document and later-epoch cases
    assert any(s["offset"] > 0 for s in states)
    assert states[-1]["epoch"] >= 2
    chunk_starts = {json.dumps(s["position"]) for s in states}
    assert len(chunk_starts) >= 3 if chunk_chars else chunk_starts == {"null"}


def test_embedded_resumes_exactly_mid_document(tok):
    states = assert_resumes_exactly(tok, DataSection(), total=8, batch=2)
    assert [s["position"] for s in states] == [None] + [{"index": 0}] * 8
    assert all(s["offset"] > 0 for s in states[1:])


def test_embedded_resumes_across_the_epoch_boundary(tok):
    documents = embedded_corpus().documents
    last = len(documents) - 1
    loader = make_loader(tok, DataSection(), seq=511, batch=8)
    start = {**loader.state_dict(), "position": {"index": last - 1}, "doc": 1, "offset": 7}
    loader.load_state_dict(start)
    stream = stream_of(tok, [documents[last]])[7:] + stream_of(tok, documents[:6])
    window_tokens = 8 * 512
    count = len(stream) // window_tokens
    batches, states = [], [start]
    for _ in range(count):
        batches.append(next(loader))
        states.append(loader.state_dict())
    got = [torch.cat([x, y[:, -1:]], dim=1).flatten().tolist() for x, y in batches]
    assert sum(got, []) == stream[: count * window_tokens]
    assert states[0]["epoch"] == 0 and states[-1]["epoch"] == 1
    crossing = next(k for k, s in enumerate(states) if s["epoch"] == 1)
    for k in (crossing - 1, crossing):
        resumed = make_loader(tok, DataSection(), seq=511, batch=8)
        resumed.load_state_dict(json_roundtrip(states[k]))
        assert_same_batches(batches[k:], take(resumed, count - k))


# ---------------------------------------------------------------------- data parallel


def test_global_batches_do_not_depend_on_the_data_parallel_layout(tok):
    """dp 1 with 6 micro-batches, dp 2 with 3 and dp 3 with 2 train on the same rows."""
    def rows(world, calls):
        loaders = [make_loader(tok, DataSection(), batch=2, rank=r, world=world) for r in range(world)]
        per_call = [torch.cat([next(loader)[0] for loader in loaders]) for _ in range(calls)]
        return torch.cat(per_call), [loader.state_dict() for loader in loaders]

    single, single_states = rows(1, 6)
    double, double_states = rows(2, 3)
    triple, triple_states = rows(3, 2)
    assert single.shape == (12, SEQ)
    assert torch.equal(single, double) and torch.equal(single, triple)
    states = single_states + double_states + triple_states
    assert all(state == states[0] for state in states)  # one state, saved once, for every rank


def test_state_from_one_layout_resumes_another(tok):
    reference = make_loader(tok, DataSection(), batch=4, world=1)
    expected = take(reference, 5)[2:]
    saved = [make_loader(tok, DataSection(), batch=2, rank=r, world=2) for r in range(2)]
    for loader in saved:
        take(loader, 2)
    state = json_roundtrip(saved[1].state_dict())
    quarter = [make_loader(tok, DataSection(), batch=1, rank=r, world=4) for r in range(4)]
    for loader in quarter:
        loader.load_state_dict(state)
    for inputs, _ in expected:
        assert torch.equal(torch.cat([next(loader)[0] for loader in quarter]), inputs)


# ------------------------------------------------------------------------------ sources


def test_folder_and_comma_list_read_files_in_path_order(tok, tmp_path):
    first = write(tmp_path / "corpus" / "a", "jsonl", DOCS[:4], name="part")
    second = write(tmp_path / "corpus", "jsonl", DOCS[4:], name="b")
    (tmp_path / "corpus" / ".hidden").mkdir()
    write(tmp_path / "corpus" / ".hidden", "jsonl", ["never read"], name="x")
    (tmp_path / "corpus" / "notes.md").write_text("not data")
    from_folder = take(make_loader(tok, DataSection(dataset=str(tmp_path / "corpus"))), 4)
    from_list = take(make_loader(tok, DataSection(dataset=f"{first}, {second}")), 4)
    assert_same_batches(from_folder, from_list)
    got = torch.cat([torch.cat([x, y[:, -1:]], dim=1) for x, y in from_folder]).flatten().tolist()
    assert got == (stream_of(tok, DOCS) * 3)[: len(got)]


@pytest.mark.parametrize("kind", ["parquet", "jsonl"])
def test_streaming_or_not_gives_the_same_batches(tok, tmp_path, kind):
    """For .jsonl, streaming reads the lines itself and map mode goes through datasets."""
    path = write(tmp_path, kind)
    streamed = take(make_loader(tok, DataSection(dataset=path, streaming=True)), 6)
    mapped = take(make_loader(tok, DataSection(dataset=path, streaming=False)), 6)
    assert_same_batches(streamed, mapped)


def test_missing_text_field_lists_the_columns(tok, tmp_path):
    for kind in ("jsonl", "parquet"):
        data = DataSection(dataset=write(tmp_path, kind), text_field="body")
        with pytest.raises(ConfigError, match="has no column 'body'; its columns are id, text"):
            make_loader(tok, data)


def test_non_text_field_is_refused(tok, tmp_path):
    with pytest.raises(ConfigError, match="'id' .* holds int values, not text"):
        make_loader(tok, DataSection(dataset=write(tmp_path, "jsonl"), text_field="id"))


def test_unknown_hub_dataset_explains_how_to_pass_local_files(tok):
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="could not be found locally or downloaded.*local .jsonl"):
        make_loader(tok, DataSection(dataset="no-such-org/no-such-dataset"))
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("./missing.jsonl", "no such file or folder: ./missing.jsonl"),
        ("{folder}", "holds no .jsonl/.json/.parquet/.txt files"),
        ("{jsonl},{txt}", "all files must be of one kind"),
        ("{csv}", "cannot read .*data.csv"),
    ],
)
def test_bad_local_datasets_are_config_errors(tok, tmp_path, spec, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "data.csv").write_text("text\nhello\n")
    spec = spec.format(
        folder=tmp_path / "empty", jsonl=write(tmp_path, "jsonl"), txt=write(tmp_path, "txt"),
        csv=tmp_path / "data.csv",
    )
    with pytest.raises(ConfigError, match=message):
        make_loader(tok, DataSection(dataset=spec))


@pytest.mark.parametrize("streaming", [True, False])
def test_malformed_file_is_a_config_error(tok, tmp_path, streaming):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{not json\n')
    with pytest.raises(ConfigError, match="could not be loaded: .*(JSON parse error|line 2 of .* is not valid JSON)"):
        make_loader(tok, DataSection(dataset=str(path), streaming=streaming))


def test_json_lines_are_read_without_importing_datasets(tmp_path):
    path = write(tmp_path, "jsonl")
    code = (
        "import sys\n"
        "from plait.config import DataSection\n"
        "from plait.data.sources import build_source\n"
        f"reader = build_source(DataSection(dataset={path!r})).open(None)\n"
        "assert reader.read(10**6)[:2] == ['alpha', 'def long_function(argument):\\n' + '    value = argument * 2 + 1\\n' * 12]\n"
        "assert 'datasets' not in sys.modules, 'datasets was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_json_lines_skip_blank_lines_and_refuse_non_objects(tok, tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text('{"text": "one"}\n\n  \n{"text": "two"}\n')
    assert build_source(DataSection(dataset=str(path))).open(None).read(10**6) == ["one", "two"]
    path.write_text('{"text": "one"}\n["two"]\n')
    with pytest.raises(ConfigError, match="holds a JSON list; JSON lines need one object per line"):
        make_loader(tok, DataSection(dataset=str(path)))


def test_empty_documents_only_is_an_error_not_a_hang(tok, tmp_path):
    loader = make_loader(tok, DataSection(dataset=write(tmp_path, "jsonl", ["", "", ""])))
    with pytest.raises(PlaitError, match="holds no text"):
        next(loader)


def test_state_of_other_data_is_refused(tok, tmp_path):
    state = make_loader(tok, DataSection()).state_dict()
    loader = make_loader(tok, DataSection(dataset=write(tmp_path, "jsonl")))
    with pytest.raises(CheckpointError, match="belongs to 'embedded:.*Resume with the same --data options"):
        loader.load_state_dict(state)


# --------------------------------------------------------------------------- throughput


def test_loader_is_far_faster_than_a_training_step(tok):
    loader = make_loader(tok, DataSection(), seq=256, batch=8)
    next(loader)
    start = time.perf_counter()
    tokens = sum(int(np.prod(next(loader)[0].shape)) for _ in range(50))
    per_batch = (time.perf_counter() - start) / 50
    assert tokens == 50 * 8 * 256
    assert per_batch < 0.025, f"{per_batch * 1e3:.1f} ms per batch"


# ----------------------------------------------------------------- mixtures


def _write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: text}) + "\n" for text in texts))
    return path


def test_a_mixture_interleaves_by_weight_and_mixes_file_kinds(tmp_path):
    web = _write_jsonl(tmp_path / "web.jsonl", [f"web {i}" for i in range(50)])
    code = tmp_path / "code.txt"
    code.write_text("".join(f"code {i}\n" for i in range(50)))
    wiki = _write_jsonl(tmp_path / "wiki.jsonl", [f"wiki {i}" for i in range(50)], field="content")
    data = DataSection(mixture=(f"{web}@0.5", f"{code}@0.3", f"{wiki}@0.2#content"))
    texts = build_source(data).open(None).read(1000)[:100]
    counts = {kind: sum(t.startswith(kind) for t in texts) for kind in ("web", "code", "wiki")}
    assert counts == {"web": 50, "code": 30, "wiki": 20}
    assert [t for t in texts if t.startswith("wiki")][:3] == ["wiki 0", "wiki 1", "wiki 2"]
    assert texts[:5] == ["web 0", "code 0", "web 1", "wiki 0", "web 2"]  # round robin, not blocks


def test_a_mixture_resumes_exactly_and_cycles_each_source(tmp_path):
    small = _write_jsonl(tmp_path / "small.jsonl", ["a", "b"])
    large = _write_jsonl(tmp_path / "large.jsonl", [f"x{i}" for i in range(40)])
    source = build_source(DataSection(mixture=(f"{small}@1", f"{large}@1")))
    reader = source.open(None)
    first = reader.read(0) + reader.read(0) + reader.read(0)
    position = json.loads(json.dumps(reader.position()))  # plain JSON, as in a checkpoint
    rest = [reader.read(0)[0] for _ in range(8)]
    resumed = source.open(position)
    assert [resumed.read(0)[0] for _ in range(8)] == rest
    assert first + rest == ["a", "x0", "b", "x1", "a", "x2", "b", "x3", "a", "x4", "b"]  # small cycles
    assert reader.shares() == {str(small): 0.5 + 0.5 / 11, str(large): 0.5 - 0.5 / 11}


def test_a_loader_over_a_mixture_reports_the_realized_shares(tmp_path):
    a = _write_jsonl(tmp_path / "a.jsonl", ["alpha " * 20] * 30)
    b = _write_jsonl(tmp_path / "b.jsonl", ["beta " * 20] * 30)
    loader = build_dataloader(DataSection(mixture=(f"{a}@3", f"{b}@1")), build_tokenizer(""), seq_len=32,
                              local_batch_size=2, dp_rank=0, dp_world_size=1)
    next(loader)
    shares = loader.source_shares()
    assert abs(shares[str(a)] - 0.75) < 0.05 and abs(shares[str(b)] - 0.25) < 0.05


@pytest.mark.parametrize(("mixture", "message"), [
    (("x.jsonl@heavy",), "the weight after @ must be a number"),
    (("x.jsonl@0",), "the weight must be positive"),
    (("@1",), "name a dataset before @WEIGHT"),
])
def test_bad_mixture_entries_are_refused(mixture, message):
    with pytest.raises(ConfigError, match=message):
        build_source(DataSection(mixture=mixture))


def test_mixture_and_dataset_together_are_refused():
    with pytest.raises(ConfigError, match="--data.mixture and --data.dataset both name"):
        DataSection(mixture=("a.jsonl",), dataset="b.jsonl").validate()
