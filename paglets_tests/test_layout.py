"""Keep paglets.py readable top to bottom (STYLE.md parts 2, 3 and 7)."""

from __future__ import annotations

import ast
import bisect
import builtins
import re
from pathlib import Path

import paglets

SOURCE = Path(paglets.__file__).read_text(encoding="utf-8")
LINES, TREE = SOURCE.splitlines(), ast.parse(SOURCE)
BANNER, RULE = re.compile(r"^# (\d+)\. (\S.*)$"), "# " + "=" * 78
STARTS = [i + 1 for i, line in enumerate(LINES) if BANNER.match(line) and LINES[i - 1] == RULE]
TITLES = [LINES[i - 1][2:] for i in STARTS]  # "11. SQLite store"

#: R4: each dependency is used in its own sections only.
OWNERS = {"cbor2": {5}, "apsw": {11}, "bottle": {17}, "psutil": {15, 19}}


def _section(lineno: int) -> int:
    return bisect.bisect_right(STARTS, lineno)


def _top_level_names() -> dict[str, int]:
    names: dict[str, int] = {}
    for node in TREE.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.setdefault(node.name, node.lineno)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for leaf in (n for t in targets for n in ast.walk(t)):
                if isinstance(leaf, ast.Name):
                    names.setdefault(leaf.id, node.lineno)
    return names


def _annotation_ids() -> set[int]:
    """Every node inside an annotation anywhere in the file (nested functions included): with
    ``from __future__ import annotations`` these are strings, never evaluated at run time."""
    nodes: list[ast.AST] = []
    for fn in ast.walk(TREE):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = fn.args
            nodes += [
                x.annotation
                for x in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg]
                if x is not None and x.annotation is not None
            ]
            nodes += [fn.returns] if fn.returns is not None else []
        elif isinstance(fn, ast.AnnAssign):
            nodes.append(fn.annotation)
    return {id(leaf) for node in nodes for leaf in ast.walk(node)}


def test_sections_are_numbered_in_order() -> None:
    numbers = [int(BANNER.match(LINES[i - 1]).group(1)) for i in STARTS]  # type: ignore[union-attr]
    assert numbers == list(range(1, len(numbers) + 1))
    assert len(numbers) >= 21


def test_every_numbered_banner_has_its_rules() -> None:
    for i, line in enumerate(LINES):
        if BANNER.match(line):
            assert LINES[i - 1] == RULE and LINES[i + 1] == RULE, f"line {i + 1}: banner without its rule lines"


def test_docstring_map_lists_every_section() -> None:
    for title in TITLES:
        assert title in paglets.__doc__, f"{title!r} missing from the module docstring map"


def test_docstring_map_matches_the_banners_in_order() -> None:
    listed = [m.group(1) for m in re.finditer(r"^ {4}(\d+\. \S.*)$", paglets.__doc__ or "", re.M)]
    assert listed == TITLES


def test_every_public_name_is_exported() -> None:
    public = {n for n in _top_level_names() if not n.startswith("_")}
    unexported, undefined = sorted(public - set(paglets.__all__)), sorted(set(paglets.__all__) - public)
    assert unexported == [], f"public but not in __all__ (export them or make them private): {', '.join(unexported)}"
    assert undefined == [], f"in __all__ but not defined: {', '.join(undefined)}"


def test_all_has_no_duplicates_and_is_grouped_by_defining_section() -> None:
    assert len(paglets.__all__) == len(set(paglets.__all__))
    defined, group, problems = _top_level_names(), None, []
    start = next(i for i, line in enumerate(LINES) if line.startswith("__all__ = ["))
    for line in LINES[start + 1 :]:
        if line.startswith("]"):
            break
        if m := re.match(r"\s+# (\d+)\. ", line):
            group = int(m.group(1))
        elif m := re.match(r'\s+"(\w+)",', line):
            name = m.group(1)
            if name in defined and _section(defined[name]) != group:
                problems.append(f"{name} is listed under section {group} but defined in section {_section(defined[name])}")
    assert problems == [], "\n".join(problems)


def test_no_runtime_reference_to_a_later_section() -> None:
    defined, problems, skip = _top_level_names(), [], _annotation_ids()
    for fn in ast.walk(TREE):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        a = fn.args
        local = {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg] if x}
        local |= {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)}
        for node in ast.walk(fn):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in local:
                where = defined.get(node.id)
                if id(node) not in skip and where and _section(where) > _section(node.lineno):
                    problems.append(f"line {node.lineno}: {node.id} is defined later, at line {where}")
    assert sorted(set(problems)) == [], "\n".join(sorted(set(problems)))


def test_each_dependency_is_used_only_in_its_own_sections() -> None:
    problems = []
    for node in ast.walk(TREE):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in OWNERS:
            section = _section(node.lineno)
            if section not in OWNERS[node.value.id]:
                problems.append(f"line {node.lineno}: {node.value.id}.{node.attr} in section {section}")
    assert problems == [], "\n".join(problems)


def test_imports_only_at_the_top() -> None:
    """R11: a function-local import is allowed only with a comment saying why (and in the guard)."""
    top = {id(node) for node in TREE.body if isinstance(node, (ast.Import, ast.ImportFrom))}
    problems = [
        f"line {node.lineno}: {LINES[node.lineno - 1].strip()}"
        for node in ast.walk(TREE)
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top and "#" not in LINES[node.lineno - 1]
    ]
    assert problems == [], "\n".join(problems)
    assert all(
        _section(node.lineno) == 1 for node in TREE.body if isinstance(node, (ast.Import, ast.ImportFrom)) and node.lineno > STARTS[0]
    )


def test_no_builtin_is_shadowed_and_no_dunder_globals() -> None:
    names = set(_top_level_names())
    assert sorted(names & set(dir(builtins))) == []
    assert sorted(n for n in names if n.startswith("__") and n not in ("__all__", "__version__")) == []


def test_the_script_guard_runs_the_module_as_paglets() -> None:
    """R10: the guard re-imports the file as ``paglets`` and calls main().  It stands at the top,
    right after the docstring and the __future__ import, so a script run executes the body once."""
    guard = TREE.body[2]
    assert isinstance(TREE.body[1], ast.ImportFrom) and TREE.body[1].module == "__future__"
    assert isinstance(guard, ast.If) and ast.unparse(guard.test) == "__name__ == '__main__'"
    assert [ast.unparse(stmt) for stmt in guard.body] == ["import paglets", "raise SystemExit(paglets.main())"]
