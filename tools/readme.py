"""Write README.md from nbs/index.ipynb without Quarto (nbdev-readme needs Quarto).

Markdown cells are copied (links relative to nbs/ rewritten for the repository root); code cells become ```python blocks (directive lines `#|` dropped, `#| hide` cells skipped).
`--check` exits 1 when README.md differs from what would be written.
"""
import json, re, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADER = "<!-- Generated from nbs/index.ipynb by `make readme` (tools/readme.py). Do not edit by hand. -->\n\n"

def _relink(md: str) -> str:
    "Links relative to nbs/ (what the docs site needs) made relative to the repository root (what README.md needs)."
    return re.sub(r"\]\((?!https?:|#|/|nbs/)([^)\s]+)\)", r"](nbs/\1)", md)

def render(nb_path=ROOT / "nbs" / "index.ipynb") -> str:
    nb = json.loads(Path(nb_path).read_text())
    parts = []
    for c in nb["cells"]:
        src = "".join(c["source"]).rstrip()
        if not src: continue
        if c["cell_type"] == "markdown":
            parts.append(_relink(src))
        elif c["cell_type"] == "code":
            lines = src.splitlines()
            directives = [l for l in lines if l.startswith("#|")]
            if any(d.split()[1:2] in (["hide"], ["exporti"]) for d in directives if len(d.split()) > 1): continue
            code = "\n".join(l for l in lines if not l.startswith("#|")).strip()
            if code: parts.append(f"```python\n{code}\n```")
    return HEADER + "\n\n".join(parts) + "\n"

def main(argv=sys.argv[1:]) -> int:
    text, readme = render(), ROOT / "README.md"
    if "--check" in argv:
        if not readme.exists() or readme.read_text() != text:
            print("README.md is out of date with nbs/index.ipynb: run `make readme` and commit.", file=sys.stderr)
            return 1
        return 0
    readme.write_text(text)
    print(f"wrote {readme.relative_to(ROOT)}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
