import os
import sys

# Test the package of this checkout (python/epmoe) unless asked to test an installed one
# (EPMOE_TEST_INSTALLED=1 after `pip install .`). The numpy models next to the tests are
# importable either way.
HERE = os.path.dirname(os.path.abspath(__file__))
if not os.environ.get("EPMOE_TEST_INSTALLED"):
    sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
