"""`python -m finetune.docs README.md`: regenerate the recipe reference between its markers."""

import sys
from pathlib import Path

from finetune.config import reference_markdown

BEGIN, END = "<!-- recipe-reference:begin -->", "<!-- recipe-reference:end -->"


def main(path: str) -> None:
    text = Path(path).read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    Path(path).write_text(f"{head}{BEGIN}\n{reference_markdown()}\n{END}{tail}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "README.md")
