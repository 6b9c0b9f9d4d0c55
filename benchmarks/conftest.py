"""pytest-benchmark entries share the test suite's settings (offline, interpreter without a GPU)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from conftest import *  # noqa: E402,F401,F403
