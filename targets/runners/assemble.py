"""Write the runner modules into a standalone file, between its marker lines, or check they are there.

    python -m edgeres.targets.runners.assemble FILE...           rewrite the runners part of each FILE
    python -m edgeres.targets.runners.assemble --check FILE...   exit 1 naming each FILE whose copy differs

A standalone file (the device bench runner, the exported app's script) marks where the runners go with
``BEGIN`` and ``END`` below; everything between them is replaced by each module of ``targets.runners``
as it is, less its ``from __future__`` line (the standalone file has its own at its top), so the copy is
the module byte for byte otherwise. Names must not clash: the assembled file refuses a top-level name
defined twice.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from edgeres.targets.runners import MODULES

HERE = Path(__file__).resolve().parent
BEGIN = "# >>> runners: assembled from targets/runners by `python -m edgeres.targets.runners.assemble FILE`; edit there, not here"
END = "# <<< runners"
FUTURE = "from __future__ import annotations\n"


def module_text(name: str) -> str:
    """The runner module ``name`` as it goes into a standalone file."""
    text = (HERE / f"{name}.py").read_text(encoding="utf-8")
    if text.count(FUTURE) != 1:
        raise ValueError(f"targets/runners/{name}.py: expected one `{FUTURE.strip()}` line")
    return f"# --- targets/runners/{name}.py ---\n" + text.replace(FUTURE, "", 1)


def runners_block() -> str:
    classes = ", ".join(_runner_class(n) for n in MODULES)
    return (BEGIN + "\n\n" + "\n\n".join(module_text(n).rstrip("\n") + "\n" for n in MODULES)
            + f"\n\nRUNNER_CLASSES = ({classes},)\n" + END)


def assemble(text: str, source: str = "the file") -> str:
    """``text`` with its runners part (between BEGIN and END) replaced by the current runner modules."""
    lines = text.split("\n")
    starts = [i for i, line in enumerate(lines) if line == BEGIN]
    ends = [i for i, line in enumerate(lines) if line == END]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise ValueError(f"{source}: needs exactly one runners part, from the line\n{BEGIN}\nto the line\n{END}")
    out = "\n".join([*lines[: starts[0]], runners_block(), *lines[ends[0] + 1:]])
    _check_names(out, source)
    return out


def _runner_class(name: str) -> str:
    tree = ast.parse((HERE / f"{name}.py").read_text(encoding="utf-8"))
    found = [n.name for n in tree.body if isinstance(n, ast.ClassDef) and n.name.endswith("Runner")]
    if len(found) != 1:
        raise ValueError(f"targets/runners/{name}.py: expected one class named *Runner, found {found}")
    return found[0]


def _check_names(text: str, source: str) -> None:
    seen, clashes = set(), set()
    for node in ast.parse(text).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, ast.Assign):
            names = [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names = [node.target.id]
        else:
            continue
        clashes.update(n for n in names if n in seen)
        seen.update(names)
    if clashes:
        raise ValueError(f"{source}: top-level names defined twice once the runners are in: {', '.join(sorted(clashes))}")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    check = "--check" in args
    files = [Path(a) for a in args if a != "--check"]
    if not files:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    stale = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        new = assemble(text, str(path))
        if new != text:
            stale.append(path)
            if not check:
                path.write_text(new, encoding="utf-8")
    for path in stale:
        print(f"{path}: {'differs from targets/runners' if check else 'runners rewritten'}", file=sys.stderr)
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
