"""What the hierarchical model's "decided" ready rule changes: positions whose context word differs from the
older lead-byte rule (``layout_words(decided=True)`` vs ``decided=False``), on real and on invalid text.

"later": the position now reads an older word (the old rule read a word whose end was not yet decided: a
leak); "earlier": it now reads a newer one (the old rule waited for a character that a lead byte announced
but that never came). Each document is one row, split with ``max_word_bytes`` (default 100).

    python scripts/ready_rule_cost.py
"""

from __future__ import annotations

import argparse
import random

import torch

from bytelm.data.chatterbot import chatterbot_documents
from bytelm.data.shakespeare import shakespeare_documents
from bytelm.models.word_layout import layout_words, split_word_starts


def changed(rows: list[bytes], cap: int) -> tuple[int, int, int]:
    """(bytes, positions read later, positions read earlier) over ``rows``."""
    n = later = earlier = 0
    for data in rows:
        ids = torch.tensor([list(data)])
        ws = torch.from_numpy(split_word_starts(list(data), cap)).unsqueeze(0)
        new = layout_words(ids, ws, decided=True).ctx_idx[0]
        old = layout_words(ids, ws, decided=False).ctx_idx[0]
        n, later, earlier = n + len(data), later + int((new < old).sum()), earlier + int((new > old).sum())
    return n, later, earlier


def samples() -> dict[str, list[bytes]]:
    ru = "Привет, мир! Это проверка: «ёлки-палки», 2024 год.\nЁжик в тумане. Щука и Эхо.\n" * 200
    fr = "Le café où nous étions était très animé; « À bientôt », dit-il. Ça va? Voilà. " * 200
    rng = random.Random(0)
    return {
        "Shakespeare validation": [d.data for d in shakespeare_documents("validation")],
        "Shakespeare (all)": [d.data for d in shakespeare_documents("all")],
        "chatterbot, 28 languages (all)": [
            d.data for s in ("train", "validation") for d in chatterbot_documents(s)
        ],
        "Latin-1 French (invalid UTF-8)": [fr.encode("latin-1")],
        "cp1251 Russian (invalid UTF-8)": [ru.encode("cp1251")],
        "random bytes": [bytes(rng.randrange(256) for _ in range(100_000))],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-word-bytes", type=int, default=100)
    args = ap.parse_args()
    print("| text | bytes | read later | read earlier |\n|---|---|---|---|")
    for name, rows in samples().items():
        n, later, earlier = changed(rows, args.max_word_bytes)
        print(f"| {name} | {n:,} | {later:,} | {earlier:,} |")


if __name__ == "__main__":
    main()
