"""The planner's shape: one planner per recipe step type, the plan's typed fields."""

from __future__ import annotations

import typing

from ftkit.plan.build import PLANNERS
from ftkit.recipe.models import Step


def test_every_recipe_step_type_has_one_planner() -> None:
    """Adding a step type to the recipe without a planner fails here, not in a user's plan."""
    union = typing.get_args(Step)[0]
    types = {typing.get_args(cls.model_fields["type"].annotation)[0] for cls in typing.get_args(union)}
    assert types == set(PLANNERS)
