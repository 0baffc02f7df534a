"""The only part of the project that imports the webui's ``modules``."""
