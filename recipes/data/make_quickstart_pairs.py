"""Generate the preference quickstart's pairs: the same three-word category task as the
quickstart, as preferences. The chosen answer is the words' category, the rejected one another
category. Held-out pairs (the recipe's `eval: {size: 60}`) are new combinations of known words,
so the model ranks them right only by learning which words go with which category: the tiny
random model starts near 50% (a coin toss per pair). Deterministic.

    python recipes/data/make_quickstart_pairs.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from make_quickstart_data import CATEGORIES, INSTRUCTION


def main() -> None:
    rng = random.Random(4321)
    seen: set[str] = set()
    pairs = []
    while len(pairs) < 360:
        cat = rng.choice(sorted(CATEGORIES))
        words = " ".join(rng.sample(CATEGORIES[cat], 3))
        if words in seen:
            continue
        seen.add(words)
        wrong = rng.choice([c for c in sorted(CATEGORIES) if c != cat])
        pairs.append({"prompt": f"{INSTRUCTION}\n\n{words}", "chosen": cat, "rejected": wrong})
    path = Path(__file__).parent / "quickstart-pairs.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for p in pairs:
            fh.write(json.dumps(p) + "\n")
    print(f"{len(pairs)} pairs (unique word triples)")


if __name__ == "__main__":
    main()
