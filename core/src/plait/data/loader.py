"""Packs documents into fixed-length training sequences, resumably.

Documents become ``bos + tokens + eos`` and are concatenated into one token stream, cut
into consecutive windows of ``seq_len + 1`` tokens (inputs = window[:-1], labels =
window[1:]). Each iteration takes the next **global** group of
``local_batch_size * dp_world_size`` windows, and rank r keeps rows ``[r*B, (r+1)*B)``:
what a step trains on is the same for every data-parallel layout.

A global batch ends exactly where the next one starts, so the whole state is the stream
position of the next unread token: the epoch, where the current chunk of documents
starts in the source, which document of the chunk, and how many of its tokens were
used. It is the same on every rank and loads into any layout (another dp size, batch
size or seq_len); resuming re-reads and re-tokenizes that one document.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from plait.config import DataSection
from plait.data.sources import DocumentReader, DocumentSource, Position, build_source
from plait.data.tokenizer import Tokenizer
from plait.errors import CheckpointError, PlaitError

_STATE_VERSION = 1


class TokenLoader:
    """An endless iterator of ``(inputs, labels)``, each a LongTensor [local_batch_size, seq_len]."""

    def __init__(
        self,
        source: DocumentSource,
        tokenizer: Tokenizer,
        *,
        seq_len: int,
        local_batch_size: int,
        dp_rank: int,
        dp_world_size: int,
        chunk_chars: int | None = None,
    ) -> None:
        if seq_len < 1 or local_batch_size < 1 or not 0 <= dp_rank < dp_world_size:
            raise ValueError(
                f"bad loader layout: seq_len={seq_len}, local_batch_size={local_batch_size}, "
                f"dp_rank={dp_rank}, dp_world_size={dp_world_size}"
            )
        self.source = source
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.local_batch_size = local_batch_size
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        tokens_per_batch = (seq_len + 1) * local_batch_size * dp_world_size
        # Characters tokenized at once: a few batches' worth (about 3-4 characters per
        # token), small enough that one chunk never stalls a step for long.
        self.chunk_chars = chunk_chars or int(np.clip(8 * tokens_per_batch, 1 << 15, 1 << 22))

        self._epoch = 0
        self._chunk_position: Position = None  # where the current chunk starts in the source
        self._resume_doc = 0  # documents of the chunk to skip when reopening the source
        self._resume_offset = 0  # tokens of the next document to skip when reopening
        self._reader: DocumentReader | None = None  # None: reopen at the saved position
        self._chunk = np.zeros(0, dtype=np.int32)  # the chunk's documents, concatenated
        self._doc_starts = np.zeros(1, dtype=np.int64)  # where each document starts in _chunk
        self._cursor = 0  # next unread token of _chunk
        self._epoch_has_tokens = False
        self._epoch_from_start = True

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> TokenLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        window = self.seq_len + 1
        group = self.local_batch_size * self.dp_world_size
        tokens = self._take(group * window).reshape(group, window)
        rows = tokens[self.dp_rank * self.local_batch_size : (self.dp_rank + 1) * self.local_batch_size]
        rows = torch.from_numpy(rows.astype(np.int64))
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def _take(self, count: int) -> np.ndarray:
        pieces = []
        while count > 0:
            if self._reader is None or self._cursor == len(self._chunk):
                self._next_chunk()
            piece = self._chunk[self._cursor : self._cursor + count]
            self._cursor += len(piece)
            count -= len(piece)
            pieces.append(piece)
        return np.concatenate(pieces)

    def _next_chunk(self) -> None:
        skip_tokens = 0
        if self._reader is None:  # fresh, or just loaded a state: reopen at its position
            self._reader = self.source.open(self._chunk_position)
            self._reader.skip(self._resume_doc)
            skip_tokens = self._resume_offset
        position = self._reader.position()
        texts = self._reader.read(self.chunk_chars)
        if not texts:  # end of the data: the next epoch starts from the beginning
            if skip_tokens:
                raise CheckpointError(
                    "the data loader state points inside a document past the end of the data: the data "
                    "changed since the checkpoint. Resume with the same --data options."
                )
            if self._epoch_from_start and not self._epoch_has_tokens:
                raise PlaitError(
                    f"the dataset ({self.source.identity}) holds no text: every document is empty. "
                    "Check --data.dataset and --data.text_field."
                )
            self._epoch += 1
            self._epoch_has_tokens, self._epoch_from_start = False, True
            self._reader = self.source.open(None)
            position = self._reader.position()
            texts = self._reader.read(self.chunk_chars)
        self._chunk_position = position
        self._set_chunk(texts)
        if skip_tokens > self._doc_starts[1] - self._doc_starts[0]:
            raise CheckpointError(
                f"the data loader state points at token {skip_tokens} of a document that has only "
                f"{self._doc_starts[1]} tokens: the data or the tokenizer changed since the checkpoint. "
                "Resume with the same --data options and tokenizer."
            )
        self._cursor = skip_tokens
        self._epoch_has_tokens = self._epoch_has_tokens or len(self._chunk) > 0

    def _set_chunk(self, texts: list[str]) -> None:
        bos, eos = self.tokenizer.bos_id, self.tokenizer.eos_id
        encoded = self.tokenizer.encode_batch(texts)
        # Empty documents add nothing, not even bos/eos.
        lengths = np.array([len(ids) + 2 if text else 0 for text, ids in zip(texts, encoded)], dtype=np.int64)
        self._doc_starts = np.concatenate(([0], np.cumsum(lengths)))
        chunk = np.empty(int(self._doc_starts[-1]), dtype=np.int32)
        for start, length, ids in zip(self._doc_starts[:-1].tolist(), lengths.tolist(), encoded):
            if length:
                chunk[start] = bos
                chunk[start + 1 : start + length - 1] = ids
                chunk[start + length - 1] = eos
        self._chunk = chunk

    @property
    def skipped_rows(self) -> int:
        """Malformed rows skipped so far (``--data.bad_rows skip``)."""
        return self.source.skipped_rows

    def source_shares(self) -> dict[str, float]:
        """For a mixture: the share of documents each source gave so far (read ahead of
        training by at most one chunk); empty otherwise."""
        return self._reader.shares() if self._reader is not None and hasattr(self._reader, "shares") else {}

    # ---------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """The stream position of the next unread token, as plain JSON data."""
        if self._reader is None:  # not started since construction or load_state_dict
            doc, offset = self._resume_doc, self._resume_offset
        else:
            # the last document starting at or before the cursor (empty ones start where
            # the next begins, and skipping them is harmless)
            doc = int(np.searchsorted(self._doc_starts, self._cursor, side="right")) - 1
            doc = min(doc, len(self._doc_starts) - 1)
            offset = self._cursor - int(self._doc_starts[doc])
        return {
            "version": _STATE_VERSION,
            "source": self.source.identity,
            "tokenizer": {"name": self.tokenizer.name, "fingerprint": self.tokenizer.fingerprint},
            "epoch": self._epoch,
            "position": self._chunk_position,
            "doc": doc,
            "offset": offset,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise CheckpointError(
                f"data loader state version {state.get('version')!r} is not the supported "
                f"{_STATE_VERSION}; resume with the plait version that wrote the checkpoint."
            )
        if state["source"] != self.source.identity:
            raise CheckpointError(
                f"the checkpoint's data loader state belongs to {state['source']!r} but this run reads "
                f"{self.source.identity!r}. Resume with the same --data options, or start a fresh run."
            )
        saved = state.get("tokenizer")  # checkpoints before 2026-12 do not record it
        if saved and saved["fingerprint"] != self.tokenizer.fingerprint:
            raise CheckpointError(
                f"the checkpoint was trained with another tokenizer ({saved['name']}, fingerprint "
                f"{saved['fingerprint']}) than this run's ({self.tokenizer.name}, fingerprint "
                f"{self.tokenizer.fingerprint}): its token ids would mean other text. Resume with the same "
                "--data.tokenizer, --data.bos_token and --data.eos_token, or start a fresh run in another "
                "--job.dump_folder."
            )
        self._epoch = int(state["epoch"])
        self._chunk_position = state["position"]
        self._resume_doc = int(state["doc"])
        self._resume_offset = int(state["offset"])
        self._reader = None
        self._chunk = np.zeros(0, dtype=np.int32)
        self._doc_starts = np.zeros(1, dtype=np.int64)
        self._cursor = 0
        self._epoch_has_tokens = False
        self._epoch_from_start = False


def build_dataloader(
    data: DataSection,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    local_batch_size: int,
    dp_rank: int,
    dp_world_size: int,
) -> TokenLoader:
    """The loader for ``data``; a bad dataset or text field is a ConfigError raised here."""
    return TokenLoader(
        build_source(data),
        tokenizer,
        seq_len=seq_len,
        local_batch_size=local_batch_size,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
    )
