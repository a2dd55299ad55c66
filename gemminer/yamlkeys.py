"""A YAML loader that refuses a key given twice in one mapping: plain YAML keeps the last one silently,
so a grid with two variants of one name would run only the second."""

from __future__ import annotations

from typing import Any

import yaml


class DuplicateKey(yaml.YAMLError):
    """A mapping names one key twice; the message says which, and both lines."""


class UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that raises `DuplicateKey` (merge keys ``<<`` may still be overridden)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base loader says so
                break
            line = key_node.start_mark.line + 1
            if first is not None:
                raise DuplicateKey(f"duplicate key {key!r} on line {line} (first on line {first}); YAML would keep "
                                   "only the last one: give each key once")
            seen[key] = line
        return super().construct_mapping(node, deep)


def load(text: str) -> Any:
    """`yaml.safe_load`, refusing duplicate keys anywhere in the document."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
