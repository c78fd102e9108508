"""Lines of each algorithm file by role (the table of the file-shape issue):

    python benchmarks/line_roles.py .          # or any checkout: python benchmarks/line_roles.py /tmp/old

docstring (the module's); Args + presets (from the first statement after the imports up to
`resolve`); validation (`resolve`); algorithm (after `resolve` through `make_train` and `Trainer`);
host (the imports and everything after)."""
import ast
import sys
from pathlib import Path

root = Path(sys.argv[1])
print("| file | lines | docstring | Args + presets | validation | algorithm | host |\n|---|---|---|---|---|---|---|")
for name in ("mbpo", "tdml", "pets", "dam", "sac"):
    src = (root / "algorithms" / f"{name}.py").read_text()
    tree = ast.parse(src)
    total = len(src.splitlines())
    doc = tree.body[0].end_lineno if isinstance(tree.body[0], ast.Expr) else 0
    def span(node):
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        return start, node.end_lineno
    spans = {}
    names = [getattr(n, "name", None) or (n.targets[0].id if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name) else None) for n in tree.body]
    idx = {nm: i for i, nm in enumerate(names) if nm}
    args_i, resolve_i, make_i = idx["Args"], idx["resolve"], idx["make_train"]
    line_of = lambda i: span(tree.body[i])[0]
    # Args + presets: from the first statement after the imports up to resolve; validation: resolve;
    # algorithm: after resolve through make_train; host: imports and everything after make_train.
    first = next(i for i, n in enumerate(tree.body[1:], 1) if not isinstance(n, (ast.Import, ast.ImportFrom)))
    a0, r0, r1 = line_of(first), line_of(resolve_i), span(tree.body[resolve_i])[1]
    m1 = span(tree.body[make_i])[1]
    after = [i for i in range(make_i + 1, len(tree.body)) if names[i] in ("Trainer",)]
    if after:
        m1 = max(m1, span(tree.body[after[-1]])[1])
    args_n, val_n, alg_n = r0 - a0, r1 - r0 + 1, m1 - r1
    host = total - doc - args_n - val_n - alg_n
    print(f"| {name}.py | {total} | {doc} | {args_n} | {val_n} | {alg_n} | {host} |")
