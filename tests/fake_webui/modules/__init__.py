"""Test double of the webui's ``modules`` package (A1111 v1.10.1); see ../README.md."""
