"""Load a job config from YAML with `--set dotted.key=value` overrides, and report errors by key name."""

from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import ValidationError

from actors.config import JobConfig
from sparsevar.backends import ModelConfig

BACKENDS = tuple(get_args(cls.model_fields["backend"].annotation)[0] for cls in get_args(get_args(ModelConfig)[0]))


class ConfigError(ValueError):
    """A config or input problem found before any work starts."""


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is read as YAML, so `0.5`, `false` and `[1, 2]` work."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment!r}: expected dotted.key=value, e.g. --set sparsevar.tau=0.5")
    *parents, leaf = key.strip().split(".")
    node = tree
    for name in parents:
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: {name!r} is a value, not a section")
        node = child
    node[leaf] = yaml.safe_load(raw)


def _describe(error: dict[str, Any], tree: dict[str, Any]) -> str:
    loc = [str(part) for part in error["loc"]]
    if loc[:1] == ["model"] and len(loc) > 1 and loc[1] == str(tree.get("model", {}).get("backend")):
        loc.pop(1)  # the discriminated union's tag is not a key the user wrote
    key = ".".join(loc)
    if error["type"] == "union_tag_invalid":  # an unknown backend: name it and the valid ones, not the whole section
        return f"{key}.backend: unknown backend {error['ctx']['tag']!r}; use one of {error['ctx']['expected_tags']}"
    if error["type"] == "union_tag_not_found":
        return f"{key}.backend: missing; use one of {', '.join(repr(tag) for tag in BACKENDS)}"
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key (check its spelling and section)"
    return f"{key}: {error['msg']} (got {error.get('input')!r})"


def load_config(path: str | Path, overrides: list[str] = ()) -> JobConfig:
    """Read, override and validate; any problem raises ConfigError naming the file and the key."""
    try:
        tree = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path} (try configs/tiny.yaml)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(tree).__name__}")
    for assignment in overrides:
        apply_override(tree, assignment)
    try:
        return JobConfig.model_validate(tree)
    except ValidationError as exc:
        problems = "\n  ".join(_describe(err, tree) for err in exc.errors())
        raise ConfigError(f"invalid config {path}:\n  {problems}") from None
