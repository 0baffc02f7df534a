"""``python -m klora``: see :mod:`klora.cli`."""

from klora.cli import main

raise SystemExit(main())
