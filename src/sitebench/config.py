"""YAML configs validated into typed objects; an unknown key is an error naming the file and key."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from sitebench.errors import SitebenchError

ModelT = TypeVar("ModelT", bound=BaseModel)


class StrictModel(BaseModel):
    """Base of every config section: an unknown (e.g. misspelt) key is an error, never silently ignored."""

    model_config = ConfigDict(extra="forbid")


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise SitebenchError("file does not exist", path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SitebenchError(f"not valid YAML{where}", path) from None
    if not isinstance(data, dict):
        raise SitebenchError("expected a mapping of keys at the top level", path)
    return data


def parse_config(data: dict[str, Any], model: type[ModelT], source: str | Path) -> ModelT:
    """Validate ``data`` into ``model``; the first problem becomes a one-line error."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        if error["type"] == "extra_forbidden":
            raise SitebenchError(f"unknown key '{where}'", source) from None
        if error["type"] == "missing":
            raise SitebenchError(f"missing key '{where}'", source) from None
        raise SitebenchError(f"key '{where}': {error['msg']}", source) from None


def load_config(path: str | Path, model: type[ModelT]) -> ModelT:
    return parse_config(load_yaml(path), model, path)
