"""Bounded reading of the YAML a user hands ditopt (plans, redundancy maps).

:func:`load_yaml` refuses, with one clear error, before anything is built:

- text longer than :data:`MAX_TEXT_BYTES` (1 MB; a plan for 40 blocks and 50 steps is ~5 KB),
- aliases that expand to more than :data:`MAX_YAML_NODES` nodes (an alias bomb: nine anchors
  of nine aliases each are 9**9 nodes when walked; composed, they are 81), recursive aliases,
- nesting deeper than :data:`MAX_YAML_DEPTH`, and malformed YAML (naming its line).

It returns the data and the composed root node (for the line of each field); ``error(message,
line)`` makes the exception it raises (``line`` is 1-based, or None).

Example:
    >>> load_yaml("a: &x [1, 2]\\nb: *x", error=lambda m, line: ValueError(m, line))[0]
    {'a': [1, 2], 'b': [1, 2]}
    >>> bomb = "a: &a [x, x, x, x, x, x, x, x, x]\\n" + "".join(
    ...     f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\\n" for p, c in zip("abcdefgh", "bcdefghi"))
    >>> load_yaml(bomb, error=lambda m, line: ValueError(m, line))
    Traceback (most recent call last):
    ...
    ValueError: ('YAML aliases expand to more than 100000 nodes (an alias bomb?)', 6)
"""

from __future__ import annotations

from typing import Any, Callable

import yaml

MAX_TEXT_BYTES = 1_000_000  # the longest plan or map YAML read
MAX_YAML_NODES = 100_000  # the most nodes the YAML may hold once its aliases are expanded
MAX_YAML_DEPTH = 64  # the deepest nesting of collections

Error = Callable[[str, "int | None"], Exception]


class _TooDeep(Exception):
    pass


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing nesting deeper than :data:`MAX_YAML_DEPTH` as it composes."""

    _depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _TooDeep(self.peek_event().start_mark.line + 1)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def size_message(size: int) -> str | None:
    """Why text of ``size`` bytes (or characters) is refused, or None if it is not."""
    if size > MAX_TEXT_BYTES:
        return f"{size} bytes of YAML, more than the {MAX_TEXT_BYTES} ditopt reads"
    return None


def read_text(path, what: str, error: Callable[[str], Exception]) -> str:
    """The UTF-8 text of the file ``path`` (a ``what``: "plan file", "redundancy map"), at most
    :data:`MAX_TEXT_BYTES`; ``error(message)`` raised naming the file otherwise."""
    try:
        too_big = size_message(path.stat().st_size)
        if too_big:
            raise error(f"{path}: {too_big}")
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not a {what} (not UTF-8 text)") from None


def _check_duplicate_keys(root: yaml.Node, error: Error) -> None:
    """A key written twice in one mapping (YAML keeps the last silently): ``error`` at its line."""
    stack, seen_nodes = [root], set()
    while stack:
        node = stack.pop()
        if id(node) in seen_nodes:  # an alias: checked once
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value != "<<":
                    if key.value in keys:
                        raise error(f"key {key.value!r} written twice in one mapping (first at line "
                                    f"{keys[key.value] + 1})", key.start_mark.line + 1)
                    keys[key.value] = key.start_mark.line
                stack.append(value)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


def load_yaml(text: Any, *, error: Error) -> tuple[Any, yaml.Node | None]:
    """``(data, root node)`` of YAML ``text``; ``error(message, line)`` raised for anything the
    module docstring lists."""
    if not isinstance(text, str):
        raise error(f"expected YAML text, got {type(text).__name__}", None)
    too_big = size_message(len(text))
    if too_big:
        raise error(too_big, None)
    loader = _BoundedLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None, None
        _check_expansion(root, error)
        _check_duplicate_keys(root, error)
        return loader.construct_document(root), root
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise error(f"malformed YAML: {problem}", mark.line + 1 if mark is not None else None) from None
    except _TooDeep as exc:
        raise error(f"YAML nested more than {MAX_YAML_DEPTH} deep", exc.args[0]) from None
    except RecursionError:
        raise error("YAML nested too deeply", None) from None
    finally:
        loader.dispose()


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_expansion(root: yaml.Node, error: Error) -> None:
    """Count the nodes of the document with every alias expanded (each composed node once,
    iteratively); refuse past :data:`MAX_YAML_NODES` or on a recursive alias."""
    size: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            total = 1 + sum(size[id(c)] for c in _children(node))
            if total > MAX_YAML_NODES:
                raise error(f"YAML aliases expand to more than {MAX_YAML_NODES} nodes (an alias bomb?)",
                            node.start_mark.line + 1)
            size[key] = total
            continue
        if key in size:
            continue
        on_path.add(key)
        stack.append((node, True))
        for child in _children(node):
            if id(child) in on_path:
                raise error("recursive YAML alias", child.start_mark.line + 1)
            if id(child) not in size:
                stack.append((child, False))
