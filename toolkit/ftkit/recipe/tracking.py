"""Experiment tracking settings: their checks, and what a train step gets from the recipe and
the machine profile together.

TensorBoard event files are written by ftkit itself (engines.tbevents) into every train step's
directory, on by default. MLflow and W&B are off unless the recipe or the machine profile asks
(a team's server belongs in the profile; a recipe may turn it off with `false`). Their secrets
never appear in a recipe, a profile, a plan or a run directory: a tracking URI carrying a user
or password is refused, and the step receives MLFLOW_TRACKING_TOKEN / _USERNAME / _PASSWORD and
WANDB_API_KEY from ftkit's own environment by name (StepSpec.env_from_host), at the moment it
starts.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from ftkit.recipe.models import MachineTracking, Tracking

SECRET_ENV = {"mlflow": ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"),
              "wandb": ("WANDB_API_KEY",)}
ALL_SECRET_ENV = frozenset(n for names in SECRET_ENV.values() for n in names)
_WANDB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
Finding = tuple[tuple[Any, ...], str, bool]


def uri_problem(uri: str) -> str | None:
    """What is wrong with an MLflow tracking URI, or None."""
    if not uri or _CONTROL.search(uri) or uri != uri.strip():
        return "a tracking URI without spaces or control characters"
    if uri.startswith("/"):
        return None  # a local file store
    try:
        parts = urlsplit(uri)
    except ValueError as e:
        return f"not a URI ({e})"
    scheme = parts.scheme.lower()
    if "@" in parts.netloc:
        return ("credentials in the URI would be written to the plan and the run directory: put them in ftkit's "
                "environment as MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)")
    if parts.query or parts.fragment or "?" in uri or "#" in uri:
        return ("a query or fragment would be written to the plan and the run directory, and MLflow needs neither: "
                "a token belongs in ftkit's environment as MLFLOW_TRACKING_TOKEN")
    if scheme in ("http", "https"):
        if not parts.hostname:
            return f"{uri!r} names no host"
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            return f"{uri!r} has a port that is not a number from 0 to 65535"
        return None
    if scheme in ("file", "sqlite"):
        path = parts.path
        if scheme == "sqlite":  # sqlite:////abs/mlflow.db: four slashes for an absolute path
            path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
        if parts.netloc or not path.startswith("/"):
            return (f"{uri!r}: a local store needs an absolute path (file:///abs/mlruns, sqlite:////abs/mlflow.db): "
                    "a step's working directory is not the recipe's")
        return None
    if not scheme:
        return (f"{uri!r} is a relative path: give an absolute path or file:///abs/path (a step's working directory "
                "is not the recipe's)")
    return f"scheme {scheme!r}: use http(s)://host[:port], file:///abs/path or sqlite:////abs/path"


def findings(tracking: Tracking | MachineTracking, prefix: tuple[Any, ...]) -> list[Finding]:
    out: list[Finding] = []
    mlflow = tracking.mlflow
    if mlflow:
        problem = uri_problem(mlflow.tracking_uri)
        if problem:
            out.append((prefix + ("mlflow", "tracking_uri"), problem, False))
        if mlflow.experiment is not None and (not mlflow.experiment.strip() or _CONTROL.search(mlflow.experiment)):
            out.append((prefix + ("mlflow", "experiment"), "an experiment name of printable characters", False))
    wandb = tracking.wandb
    if wandb:
        for key in ("project", "entity"):
            value = getattr(wandb, key)
            if value is not None and not _WANDB_NAME.match(value):
                out.append((prefix + ("wandb", key), f"{value!r}: W&B names are letters, digits, '.', '_' and '-'",
                            False))
    return out


def effective(recipe: Tracking, machine: MachineTracking, *, recipe_name: str) -> dict[str, Any]:
    """What the train steps log to: the recipe's choice, else the machine's (false: off)."""
    mlflow = machine.mlflow if recipe.mlflow is None else (recipe.mlflow or None)
    wandb = machine.wandb if recipe.wandb is None else (recipe.wandb or None)
    return {
        "tensorboard": recipe.tensorboard,
        "mlflow": None if mlflow is None else {"tracking_uri": mlflow.tracking_uri,
                                               "experiment": mlflow.experiment or recipe_name},
        "wandb": None if wandb is None else {"project": wandb.project, "entity": wandb.entity, "mode": wandb.mode},
    }


def secret_names(effective_tracking: dict[str, Any]) -> list[str]:
    """The environment variables a train step takes from ftkit's environment (by name)."""
    return [n for service in ("mlflow", "wandb") if effective_tracking.get(service) for n in SECRET_ENV[service]]
