"""The document store: the help-centre articles in docs.jsonl, ranked by BM25 (rank_bm25, the
`pipeline` extra). Fetching each article's body is simulated as a per-document latency, which is what
makes retrieval fan-out cost time (and a smaller fan-out the degrade)."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from pathlib import Path

from rank_bm25 import BM25Okapi

DOCS = Path(__file__).with_name("docs.jsonl")
_TOKEN = re.compile(r"[a-z0-9]+")


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


@dataclass(frozen=True)
class Doc:
    id: str
    title: str
    text: str


class Store:
    def __init__(self, path: Path = DOCS, fetch_latency_s: float = 0.0) -> None:
        self.docs = [Doc(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
        self.index = BM25Okapi([tokens(f"{d.title} {d.text}") for d in self.docs])
        self.fetch_latency_s = fetch_latency_s

    def rank(self, query: str, k: int) -> list[Doc]:
        """The `k` best articles for `query` (ties in the store's order, so results are stable)."""
        scores = self.index.get_scores(tokens(query))
        order = sorted(range(len(self.docs)), key=lambda i: (-scores[i], i))
        return [self.docs[i] for i in order[:k] if scores[i] > 0]

    async def search(self, query: str, k: int) -> list[Doc]:
        """Rank, then fetch the `k` bodies (concurrently: one fetch latency, plus a little per doc)."""
        found = self.rank(query, k)
        if self.fetch_latency_s:
            await asyncio.sleep(self.fetch_latency_s * (1 + 0.25 * len(found)))
        return found

    def by_topic(self, topic: str) -> Doc | None:
        best = self.rank(topic, 1)
        return best[0] if best else None
