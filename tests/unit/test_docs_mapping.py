"""docs/from-axolotl-llamafactory.md: its ftkit recipe is a real one (validates and plans on a
two-GPU machine profile), so the page cannot drift from the recipe format."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.conftest import RECIPES, ROOT, run_cli


def test_the_pages_ftkit_recipe_validates_and_plans(tmp_path: Path) -> None:
    text = (ROOT / "docs" / "from-axolotl-llamafactory.md").read_text()
    block = re.search(r"## ftkit\n\n```yaml\n(.*?)```", text, re.S)
    assert block is not None
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(block.group(1).replace("<40-hex commit>", "0123456789abcdef" * 2 + "01234567"))
    data = tmp_path / "data"
    data.mkdir()
    (data / "support-chats.jsonl").write_text("".join(
        json.dumps({"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}) + "\n"
        for i in range(60)))
    (data / "support-pairs.jsonl").write_text("".join(
        json.dumps({"prompt": f"p{i}", "chosen": "yes", "rejected": "no"}) + "\n" for i in range(400)))
    machine = tmp_path / "m.yaml"
    profile = (RECIPES / "machines" / "dual-4090.yaml").read_text()
    profile = re.sub(r"(?m)^(\s*datasets:).*$", rf"\1 {data}", profile)
    machine.write_text(re.sub(r"(?m)^executor: docker$", "executor: local", profile))
    result = run_cli("validate", str(recipe), "--machine", str(machine))
    assert result.code == 0, result.err
    plan = run_cli("plan", str(recipe), "--machine", str(machine))
    assert plan.code == 0, plan.err
    assert "qlora; r 16, alpha 32.0, DoRA;" in plan.out and "loss on every assistant turn" in plan.out
    assert "DPO beta 0.1, qlora; from the adapter" in plan.out
