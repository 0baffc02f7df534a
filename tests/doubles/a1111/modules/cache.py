"""Mirror of modules/cache.py (A1111 v1.10.1): where the webui keeps its caches. Tests set ``cache_dir``."""

import os

from modules.paths_internal import data_path

# modules/cache.py: cache_dir = os.environ.get('SD_WEBUI_CACHE_DIR', os.path.join(data_path, "cache"))
cache_dir = os.environ.get("SD_WEBUI_CACHE_DIR", os.path.join(data_path, "cache"))
