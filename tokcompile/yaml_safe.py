"""Reading YAML recipes with bounds: `yaml.safe_load` semantics, plus three refusals.

- A key given twice in one mapping is an error naming the key (YAML would silently keep the last value).
- Aliases are shared nodes; the size of the document *after* alias expansion is bounded, so a few hundred
  bytes of nested aliases (a "billion laughs" recipe) cannot make later code that copies or serialises the
  recipe expand it into gigabytes.
- Nesting deeper than `MAX_DEPTH` is refused, and the parser's own recursion limit becomes one line.

Errors are `ValueError`s carrying a one-line reason; `recipe.load_recipe` turns them into `RecipeError`.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

MAX_BYTES = 1 << 20  # a recipe is a few kilobytes; 1 MiB leaves room for long eval task lists
MAX_EXPANDED_NODES = 100_000  # scalars, sequences and mappings after alias expansion
MAX_DEPTH = 64


class YamlBoundError(ValueError):
    """The document is valid YAML but breaks one of the bounds above."""


def _node_key(node: Node) -> str:
    text = str(node.value) if isinstance(node, ScalarNode) else f"<{node.tag.rsplit(':', 1)[-1]}>"
    return text if len(text) <= 60 else text[:57] + "..."


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys."""

    def construct_mapping(self, node: Node, deep: bool = False) -> dict:
        if isinstance(node, MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:  # the keys as written; `<<` merges may be overridden, as YAML says
                if not isinstance(key_node, ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=False)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise YamlBoundError(f"line {line}: key '{_node_key(key_node)}' is given twice in one mapping "
                                         f"(first on line {seen[key]}); keep one")
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def expanded_size(root: Node) -> tuple[int, int]:
    """(nodes after alias expansion, maximum depth) of a composed document, in O(distinct nodes).

    Aliased nodes are the same object, so each node's expanded size is computed once and reused. A
    recursive alias (`&a [*a]`) has no finite expansion: it returns (-1, -1)."""
    sizes: dict[int, int] = {}
    depths: dict[int, int] = {}
    on_path: set[int] = set()
    # iterative post-order walk: (node, children visited?)
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, visited = stack.pop()
        nid = id(node)
        if nid in sizes:
            continue
        children: list[Node] = []
        if isinstance(node, SequenceNode):
            children = list(node.value)
        elif isinstance(node, MappingNode):
            children = [n for pair in node.value for n in pair]
        if not visited:
            if nid in on_path:
                return -1, -1
            on_path.add(nid)
            stack.append((node, True))
            for child in children:
                if id(child) in on_path:
                    return -1, -1
                if id(child) not in sizes:
                    stack.append((child, False))
            continue
        on_path.discard(nid)
        total = 1 + sum(sizes[id(c)] for c in children)
        sizes[nid] = min(total, MAX_EXPANDED_NODES + 1)
        depths[nid] = 1 + max((depths[id(c)] for c in children), default=0)
    return sizes[id(root)], depths[id(root)]


def load_bounded(text: str) -> Any:
    """Parse one YAML document like `yaml.safe_load`, within the bounds of this module.

    Raises `yaml.YAMLError` for syntax errors and `YamlBoundError` for the refusals above."""
    if len(text.encode("utf-8", errors="replace")) > MAX_BYTES:
        raise YamlBoundError(f"is larger than {MAX_BYTES // 1024} KiB; a recipe is a few kilobytes of settings")
    loader = _Loader(text)
    try:
        try:
            root = loader.get_single_node()
        except RecursionError:
            too_deep = f"nests deeper than the parser can follow; keep nesting under {MAX_DEPTH} levels"
            raise YamlBoundError(too_deep) from None
        if root is None:
            return None
        size, depth = expanded_size(root)
        if size < 0:
            raise YamlBoundError("has an alias (*name) inside the value it names; write the value out")
        if depth > MAX_DEPTH:
            raise YamlBoundError(f"nests {depth} levels deep; keep nesting under {MAX_DEPTH} levels")
        if size > MAX_EXPANDED_NODES:
            raise YamlBoundError(f"expands to more than {MAX_EXPANDED_NODES} values once its aliases (*name) are "
                                 "resolved; write the values out or use fewer nested aliases")
        return loader.construct_document(root)
    finally:
        loader.dispose()
