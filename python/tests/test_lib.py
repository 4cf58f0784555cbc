"""Loading the library: a libepmoe of another ABI (major.minor) is refused at import, before any
struct or buffer of this package's version reaches it."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import epmoe

PACKAGE_ROOT = Path(epmoe.__file__).resolve().parent.parent


def _import_with(lib_path):
    env = dict(os.environ, EPMOE_LIB=str(lib_path), PYTHONPATH=str(PACKAGE_ROOT))
    return subprocess.run([sys.executable, "-c", "import epmoe"], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler to build the stand-in library")
@pytest.mark.parametrize("version, ok", [(300, False), (500, False), (400, True), (409, True)])
def test_import_checks_the_abi_version(tmp_path, version, ok):
    src = tmp_path / "stub.c"
    src.write_text(f"int epmoe_version(void) {{ return {version}; }}\n")
    so = tmp_path / "libepmoe_stub.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(so), str(src)], check=True)
    r = _import_with(so)
    if ok:  # the version passes; the stand-in then lacks the other symbols
        assert "is libepmoe" not in r.stderr
    else:
        assert r.returncode != 0
        assert "ImportError" in r.stderr and f"is libepmoe 0.{version // 100}" in r.stderr, r.stderr


def test_the_loaded_library_matches():
    assert epmoe._lib.lib.epmoe_version() // 100 == epmoe._lib.ABI_VERSION
