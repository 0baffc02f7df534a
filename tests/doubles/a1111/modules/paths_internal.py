"""Mirror of modules/paths_internal.py (A1111 v1.10.1): the paths the glue reads."""

import os
import tempfile

# modules/paths_internal.py: data_path = cmd_opts_pre.data_dir (the webui's folder by default); the double
# puts it in a temporary folder so that nothing is written beside the tests
data_path = os.path.join(tempfile.gettempdir(), "klora-double-webui")
# modules/paths_internal.py: roboto_ttf_file = os.path.join(modules_path, 'Roboto-Regular.ttf') (the double
# ships no font: the map falls back to the system's)
roboto_ttf_file = os.path.join(data_path, "modules", "Roboto-Regular.ttf")
