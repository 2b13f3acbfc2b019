"""The secrets the suite watches every command's output for (``no_secret_in_output`` in conftest.py)."""

# A password no command may ever print or log: tests put it in DSNs and URLs.
TEST_PASSWORD = "pw-Zq7xK2-never-printed"
