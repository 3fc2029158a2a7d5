"""YAML read the way the reference provider's Go library (gopkg.in/yaml.v3) reads it.

PyYAML follows YAML 1.1: ``yes``/``no``/``on``/``off`` become booleans, ``2024-01-01``
a date, and ``0o644`` a string. yaml.v3 reads the YAML 1.2 core schema plus Go's
integer syntax: ``0644`` and ``0o644`` are both octal, ``1_000`` is 1000, only
``true``/``false`` (any of three casings) are booleans, and timestamps stay strings.
An ``objects`` list that worked with the reference must give the same values here.

The loader also bounds what one document may cost: its size is checked by the caller,
and here the nesting depth and the number of aliases, so an alias bomb is refused
while it is being read rather than after it has been expanded.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

# A class's objects list is flat (a list of small maps, one secretArgs map each): 32
# levels is far beyond any real one and keeps recursion well inside Python's stack.
MAX_DEPTH = 32
# Anchors are rare in objects lists; 64 aliases allow real reuse but not a bomb.
MAX_ALIASES = 64

_INT = re.compile(
    r"""^(?:[-+]?0b[01_]+
        |[-+]?0o?[0-7_]+
        |[-+]?(?:0|[1-9][0-9_]*)
        |[-+]?0x[0-9a-fA-F_]+)$""",
    re.X,
)
_FLOAT = re.compile(
    r"""^(?:[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")


class YAMLLimitError(yaml.YAMLError):
    """The document is deeper or uses more aliases than allowed."""


class GoLoader(yaml.SafeLoader):
    """A safe loader with yaml.v3's implicit types and bounded depth and aliases."""

    yaml_implicit_resolvers: dict[Any, Any] = {}  # noqa: RUF012  # PyYAML reads it per class

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        if self.check_event(AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise YAMLLimitError(f"more than {MAX_ALIASES} aliases")
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise YAMLLimitError(f"nested deeper than {MAX_DEPTH} levels")
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_yaml_int(self, node: ScalarNode) -> int:
        text = str(self.construct_scalar(node)).replace("_", "")
        sign = -1 if text.startswith("-") else 1
        digits = text.lstrip("+-")
        if digits.startswith(("0b", "0o", "0x")):
            return sign * int(digits, 0)
        if len(digits) > 1 and digits.startswith("0"):
            return sign * int(digits, 8)
        return sign * int(digits)

    def construct_yaml_float(self, node: ScalarNode) -> float:
        text = str(self.construct_scalar(node)).replace("_", "").lower()
        if text.endswith((".inf", ".nan")):
            return float(text.replace(".", ""))
        return float(text)

    def construct_yaml_bool(self, node: ScalarNode) -> bool:
        return str(self.construct_scalar(node)).lower() == "true"

    def construct_yaml_timestamp(self, node: ScalarNode) -> str:  # type: ignore[override]  # yaml.v3 keeps the text
        # yaml.v3 hands timestamps to an interface{} as their text.
        return str(self.construct_scalar(node))


GoLoader.add_implicit_resolver("tag:yaml.org,2002:bool", _BOOL, list("tTfF"))
GoLoader.add_implicit_resolver("tag:yaml.org,2002:int", _INT, list("-+0123456789"))
GoLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
GoLoader.add_implicit_resolver("tag:yaml.org,2002:null", _NULL, ["~", "n", "N", ""])
GoLoader.add_implicit_resolver("tag:yaml.org,2002:merge", re.compile(r"^(?:<<)$"), ["<"])
for _tag, _method in (
    ("tag:yaml.org,2002:int", GoLoader.construct_yaml_int),
    ("tag:yaml.org,2002:float", GoLoader.construct_yaml_float),
    ("tag:yaml.org,2002:bool", GoLoader.construct_yaml_bool),
    ("tag:yaml.org,2002:timestamp", GoLoader.construct_yaml_timestamp),
):
    GoLoader.add_constructor(_tag, _method)


def compose(text: str) -> tuple[GoLoader, Node | None]:
    """Parse one YAML document into a node tree; the loader constructs values from it."""
    loader = GoLoader(text)
    try:
        return loader, loader.get_single_node()
    finally:
        loader.dispose()


__all__ = ["GoLoader", "MappingNode", "Node", "ScalarNode", "SequenceNode", "YAMLLimitError", "compose"]
