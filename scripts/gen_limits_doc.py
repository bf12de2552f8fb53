"""Regenerate docs/limits.md from the limits table (services/wms/limits.py).

One command: `python scripts/gen_limits_doc.py`. A test (tests/wms/test_limits.py) fails when the
file and the table differ.
"""

from __future__ import annotations

from pathlib import Path

from services.wms.limits import markdown

DOC = Path(__file__).resolve().parent.parent / "docs" / "limits.md"

if __name__ == "__main__":
    DOC.write_text(markdown())
    print(f"wrote {DOC}")
