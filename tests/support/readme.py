"""The README's runnable examples: each is a ```python block right after a ``<!-- example: NAME -->`` line."""
import re
from pathlib import Path

__all__ = ["README", "readme_examples"]

README = Path(__file__).resolve().parents[2] / "README.md"
_EXAMPLE = re.compile(r"<!-- example: (?P<name>[\w-]+) -->\s*\n```python\n(?P<code>.*?)\n```", re.DOTALL)


def readme_examples(path: Path = README) -> dict[str, str]:
    """``{name: code}`` for each marked example of the README, in order."""
    return {m["name"]: m["code"] for m in _EXAMPLE.finditer(path.read_text())}
