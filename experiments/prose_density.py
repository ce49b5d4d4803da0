"""The share of a package's non-blank lines that hold prose: a comment or a docstring.

python experiments/prose_density.py resnet_jax [--per-file]
"""

import ast
import io
import pathlib
import sys
import tokenize


def prose_lines(source: str) -> tuple[int, int]:
    """(prose lines, non-blank lines) of one module."""
    lines = source.splitlines()
    prose = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:  # a line of its own or after code
            prose.add(token.start[0])
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                prose.update(range(body[0].lineno, body[0].end_lineno + 1))
    non_blank = {i + 1 for i, line in enumerate(lines) if line.strip()}
    return len(prose & non_blank), len(non_blank)


def main(root: str, per_file: bool) -> None:
    total_prose = total = 0
    for path in sorted(pathlib.Path(root).rglob('*.py')):
        prose, lines = prose_lines(path.read_text())
        total_prose, total = total_prose + prose, total + lines
        if per_file:
            print(f'{prose / max(lines, 1):6.1%} {prose:5d}/{lines:5d} {path}')
    print(f'{root}: {total_prose / total:.1%} prose ({total_prose} of {total} non-blank lines)')


if __name__ == '__main__':
    main(sys.argv[1], '--per-file' in sys.argv)
