"""Headless Debian chromium driven by Playwright, for the review page and the report.

``.ci/run`` installs chromium; where it is missing the browser tests skip with the reason.
"""

import os
import shutil

import pytest

CHROMIUM = os.environ.get("GENSTRESS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian package 'chromium')")
# Without the background-networking flags chromium keeps calling Google's hosts, which a closed
# network refuses; --no-sandbox because CI runs as root.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
