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
from yaml.events import AliasEvent, CollectionEndEvent, CollectionStartEvent, ScalarEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

# A class's objects list is flat (a list of small maps, one secretArgs map each): 32
# levels is far beyond any real one and keeps recursion well inside Python's stack.
MAX_DEPTH = 32
# Anchors are rare in objects lists; 64 aliases allow real reuse but not a bomb.
MAX_ALIASES = 64
# Nodes in one document, an alias counting as the nodes it stands for: a class of 1,000
# objects of a dozen nodes each, with room for secretArgs. Checked while composing, so a
# megabyte of "[a,a,a,...]" stops at this many nodes (a few MiB), not at 300 MiB.
MAX_NODES = 20_000

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


class GoLoader(yaml.CSafeLoader):
    """A safe loader with yaml.v3's implicit types; libyaml composes (~15x faster than
    PyYAML's pure-Python parser, and PyPI's PyYAML wheels ship it)."""

    yaml_implicit_resolvers: dict[Any, Any] = {}  # noqa: RUF012  # PyYAML reads it per class

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
    """Parse one YAML document into a node tree; the loader constructs values from it.

    The document's cost is bounded before any node is built: a first pass over the
    parser's events (no tree) checks depth, aliases and the node count, an alias
    counting as the nodes it repeats."""
    check_cost(text)
    loader = GoLoader(text)
    try:
        return loader, loader.get_single_node()
    finally:
        loader.dispose()


def check_cost(text: str, *, max_nodes: int = MAX_NODES) -> None:
    """Raise YAMLLimitError when the YAML (all its documents) nests deeper than MAX_DEPTH,
    holds more than MAX_ALIASES aliases, or more than `max_nodes` values, an alias counting
    as the nodes it repeats: checked on the parser's events, before anything is built."""
    depth = nodes = aliases = 0
    sizes: dict[str, int] = {}
    open_anchors: list[tuple[str | None, int]] = []
    for event in yaml.parse(text, Loader=yaml.CSafeLoader):
        if isinstance(event, AliasEvent):
            aliases += 1
            if aliases > MAX_ALIASES:
                raise YAMLLimitError(f"more than {MAX_ALIASES} aliases")
            nodes += sizes.get(event.anchor or "", 1)
        elif isinstance(event, ScalarEvent):
            nodes += 1
            if event.anchor:
                sizes[event.anchor] = 1
        elif isinstance(event, CollectionStartEvent):
            nodes += 1
            depth += 1
            if depth > MAX_DEPTH:
                raise YAMLLimitError(f"nested deeper than {MAX_DEPTH} levels")
            open_anchors.append((event.anchor, nodes))
        elif isinstance(event, CollectionEndEvent):
            depth -= 1
            anchor, started = open_anchors.pop()
            if anchor:
                sizes[anchor] = nodes - started + 1
        if nodes > max_nodes:
            raise YAMLLimitError(f"more than {max_nodes} values (an alias counts as what it repeats)")


__all__ = ["GoLoader", "MappingNode", "Node", "ScalarNode", "SequenceNode", "YAMLLimitError", "check_cost", "compose"]
