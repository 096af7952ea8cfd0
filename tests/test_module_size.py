"""docs/development.rst: a module stays under about 600 lines, one job per file; a longer
one says why at the top of its docstring (``Why about N lines: ...``), N within 15 % of its
length, so the reason is revisited when the module grows."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

PACKAGE = Path(__file__).resolve().parent.parent / "fsha"
LIMIT = 600


class ModuleSizeTests(SynchronousTestCase):
    def test_long_modules_say_why(self) -> None:
        problems = []
        for path in sorted(PACKAGE.rglob("*.py")):
            text = path.read_text()
            lines = text.count("\n")
            if lines <= LIMIT:
                continue
            doc = ast.get_docstring(ast.parse(text)) or ""
            found = re.findall(r"Why about ([\d,]+) lines:", doc)
            name = path.relative_to(PACKAGE.parent)
            if len(found) != 1:
                problems.append(f"{name}: {lines} lines, {len(found)} 'Why about N lines:'")
                continue
            said = int(found[0].replace(",", ""))
            if abs(said - lines) > 0.15 * lines:
                problems.append(f"{name}: {lines} lines, says about {said}")
        self.assertEqual(problems, [])
