"""One inference interface: top-K items over the full catalogue for a batch of user histories.

Evaluation, batch recommendations and serving all go through `Recommender`, so
a model is scored the same way everywhere. Histories are item vocabulary
indices (1..n_items) in time order; mapping raw IDs to indices is the caller's
job (the vocabularies live in data/features/).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pipeline.models.sasrec import PADDING_INDEX, SASRec
from pipeline.models.scoring import Exclusion

MAX_K = 1000


# Tensors from this size up (item tables) are moved to numpy-allocated memory on CPU: numpy asks the
# kernel for transparent huge pages (madvise) on large arrays, torch's allocator does not, and a
# catalogue scan streams the whole table (1M x 64 fp32 GEMV, 2 threads: 32 ms against 44 ms).
HUGE_PAGE_MIN_BYTES = 4 * 2**20
_NUMPY_DTYPES = {torch.float32, torch.float16, torch.uint8, torch.int8, torch.int32, torch.int64}


def _huge_page_backed(model: torch.nn.Module) -> None:
    """Re-home the model's large plain CPU tensors (parameters and buffers) into numpy memory, in place."""
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if (tensor is None or type(tensor) not in (torch.Tensor, torch.nn.Parameter) or tensor.device.type != "cpu"
                        or tensor.dtype not in _NUMPY_DTYPES or tensor.numel() * tensor.element_size() < HUGE_PAGE_MIN_BYTES):
                    continue
                with torch.no_grad():
                    copy = torch.from_numpy(np.array(tensor.detach().numpy(), copy=True))
                if isinstance(tensor, torch.nn.Parameter):
                    tensor.data = copy
                else:
                    store[name] = copy


class Recommender:
    def __init__(self, model: SASRec, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        if self.device.type == "cpu":
            _huge_page_backed(self.model)
        self.n_items = model.cfg.n_items
        self.max_len = model.cfg.max_len

    @classmethod
    def load(cls, directory: str | Path, device: torch.device | str = "cpu") -> Recommender:
        """A teacher or any compressed variant directory."""
        from pipeline.models.variants import load_variant

        return cls(load_variant(Path(directory), device), device)

    def _batch(self, histories: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded inputs of each history's last max_len items, and their lengths."""
        if not histories:
            raise ValueError("histories is empty: pass at least one user history")
        recent = [list(history)[-self.max_len :] for history in histories]
        lengths = [len(items) for items in recent]
        if min(lengths) == 0:
            raise ValueError("every history needs at least one item (unknown users need a fallback)")
        for row, items in enumerate(recent):  # plain Python: cheaper than tensor reductions for short lists
            if min(items) < 1 or max(items) > self.n_items:
                raise ValueError(f"history {row} has item indices outside 1..{self.n_items}")
        width = max(lengths)
        inputs = torch.tensor([items + [PADDING_INDEX] * (width - len(items)) for items in recent], dtype=torch.long)
        return inputs, torch.tensor(lengths, dtype=torch.long)

    @torch.inference_mode()  # cheaper than no_grad: no version counters or view tracking per op
    def scores(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        """(B, n_items + 1) next-item scores; column 0 (padding) is -inf."""
        inputs, lengths = self._batch(histories)
        scores = self.model.score(inputs.to(self.device), lengths.to(self.device)).float()
        scores[:, PADDING_INDEX] = float("-inf")
        return scores

    @torch.inference_mode()
    def recommend(
        self, histories: Sequence[Sequence[int]], k: int = 10, exclude_seen: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k item indices and scores per history, best first; seen items excluded by default.

        A user who has seen all but j < k items gets those j, then padding (index 0) with score -inf."""
        if not 1 <= k <= min(MAX_K, self.n_items):
            raise ValueError(f"k must be between 1 and {min(MAX_K, self.n_items)}, got {k}")
        inputs, lengths = self._batch(histories)
        user_vectors = self.model.last_hidden(inputs.to(self.device), lengths.to(self.device)).float()
        # The model's own scorer (pipeline/models/scoring.py) selects the top-k without a full score
        # matrix; padding is always excluded, seen items (the whole history, not only the last max_len) here.
        exclude = Exclusion.from_lists(histories) if exclude_seen else None
        items, scores = self.model.top_k(user_vectors, k, exclude)
        return items.cpu(), scores.cpu()
