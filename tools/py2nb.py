"""Turn a percent-format script into a notebook: ``python tools/py2nb.py src.py notebooks/NN_name.ipynb``.

Cells start with ``# %%`` (code) or ``# %% [markdown]`` (markdown; each line's leading ``# `` is stripped). The first
code cell is tagged ``parameters``; a cell starting with ``# NBVAL_SKIP`` or ``# NBVAL_CHECK_OUTPUT`` keeps it. The
kernel is ``python3``. Outputs are empty: executed copies live in ``results/<notebook>/<profile>/executed.ipynb``.
"""
import sys

import nbformat


def convert(text: str):
    cells, kind, buf = [], None, []

    def flush():
        if kind is None:
            return
        body = "\n".join(buf).strip("\n")
        if kind == "markdown":
            body = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in body.splitlines())
            cells.append(nbformat.v4.new_markdown_cell(body))
        elif body:
            cells.append(nbformat.v4.new_code_cell(body))

    for line in text.splitlines():
        if line.startswith("# %%"):
            flush()
            kind, buf = ("markdown" if "[markdown]" in line else "code"), []
        else:
            buf.append(line)
    flush()
    for c in cells:
        if c.cell_type == "code":
            c.metadata["tags"] = ["parameters"]
            break
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, c in enumerate(nb.cells):
        c["id"] = f"cell-{i:02d}"
    return nb


if __name__ == "__main__":
    src, dst = sys.argv[1], sys.argv[2]
    nbformat.write(convert(open(src).read()), dst)
    print(f"wrote {dst}")
