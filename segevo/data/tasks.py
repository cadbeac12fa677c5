"""The task vocabulary: (dataset, class) pairs -> task ids, the labels the context priors are indexed by.

It lives on the data side because the data decides it (the tasks are the (source, class) pairs of the training
cases) and the loader workers attach task ids to every sample; the model only reads it. A DataLoader worker
therefore never imports the model to build a batch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

NULL_TASK = ("*", "<unknown>")


class TaskVocabulary:
    """(dataset, class) pairs -> task ids, id 0 being the null task. Order is kept: ids are stable."""

    def __init__(self, pairs: Iterable[tuple[str, str]] = ()):
        unique = dict.fromkeys((str(d), str(c)) for d, c in pairs if (d, c) != NULL_TASK)
        self.pairs: list[tuple[str, str]] = [NULL_TASK, *unique]
        self._index = {p: i for i, p in enumerate(self.pairs)}

    def __len__(self) -> int:
        return len(self.pairs)

    def id(self, dataset: str | None, name: str) -> int:
        """Exact (dataset, class) id; with no dataset, the first task of that class; else the null task."""
        if dataset is not None:
            return self._index.get((dataset, name), 0)
        return next((i for i, (_, c) in enumerate(self.pairs) if c == name and i), 0)

    def closest(self, name: str, n: int = 3) -> list[str]:
        import difflib

        return difflib.get_close_matches(name, sorted({c for _, c in self.pairs[1:]}), n=n)

    def to_json(self) -> str:
        return json.dumps([list(p) for p in self.pairs[1:]])

    @classmethod
    def from_json(cls, text: str) -> TaskVocabulary:
        return cls(tuple(p) for p in json.loads(text))
