"""Mirror of modules/infotext_utils.py (A1111 v1.10.1): quote() for infotext values."""

from __future__ import annotations

import json


# modules/infotext_utils.py: quote(text)
def quote(text):
    if "," not in str(text) and "\n" not in str(text) and ":" not in str(text):
        return text
    return json.dumps(text, ensure_ascii=False)
