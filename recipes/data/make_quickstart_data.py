"""Generate the quickstart's synthetic task: name the category of three words.

Held-out prompts are new combinations of known words, so a model can only score on them
by learning the task, not by memorising rows. A constant answer scores about 1/6, and the
untrained tiny model scores 0. Deterministic: running it again gives the same files.

    python recipes/data/make_quickstart_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CATEGORIES = {
    "fruit": "apple banana cherry mango peach plum grape lemon melon kiwi".split(),
    "animal": "dog cat horse sheep goat tiger lion zebra otter mouse".split(),
    "color": "red blue green yellow purple orange pink brown black white".split(),
    "vehicle": "car bus train truck bicycle tram scooter boat plane van".split(),
    "tool": "hammer wrench saw drill chisel pliers shovel rake axe file".split(),
    "instrument": "piano violin guitar drum flute cello harp trumpet oboe banjo".split(),
}
INSTRUCTION = "Name the category of these words."


def rows(n: int, rng: random.Random) -> list[dict[str, str]]:
    out = []
    for _ in range(n):
        cat = rng.choice(sorted(CATEGORIES))
        words = rng.sample(CATEGORIES[cat], 3)
        out.append({"instruction": INSTRUCTION, "input": " ".join(words), "output": cat})
    return out


def main() -> None:
    rng = random.Random(1234)
    pool = rows(1200, rng)
    seen: set[str] = set()
    unique = []
    for r in pool:
        if r["input"] not in seen:
            seen.add(r["input"])
            unique.append(r)
    evals, train = unique[:60], unique[60:660]
    here = Path(__file__).parent
    for name, data in (("quickstart-train.jsonl", train), ("quickstart-eval.jsonl", evals)):
        with open(here / name, "w", encoding="utf-8") as fh:
            for r in data:
                fh.write(json.dumps(r) + "\n")
    print(f"train {len(train)} rows, eval {len(evals)} rows (no overlap)")


if __name__ == "__main__":
    main()
