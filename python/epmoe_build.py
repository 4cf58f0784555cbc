"""The build backend of the epmoe Python package (pyproject.toml names it; pip loads it from here).

It is setuptools' own backend plus three commands:
  build_py     builds libepmoe.so with the repository's Makefile (`make lib`, incremental, so an
               up-to-date build/ costs nothing) — or takes the file named by $EPMOE_LIB — and puts
               it inside the package, where epmoe looks first after $EPMOE_LIB;
  bdist_wheel  tags the wheel py3-none-<platform>: it carries a native library but no CPython
               extension, so any Python 3 on this platform can load it;
  build        keeps setuptools' scratch files in python/build instead of the Makefile's build/.
$EPMOE_MAKE_ARGS adds make arguments (e.g. "CUDA=0" for a CPU-only library, "-j8").

Nothing here is shipped in the wheel; nothing is fetched from the network beyond the
setuptools and wheel that pip's build isolation installs.
"""
import os
import re
import shlex
import shutil
import subprocess

from setuptools import Command
from setuptools.build_meta import *  # noqa: F401,F403  (the PEP 517 hooks themselves)
from setuptools.command.build_py import build_py as _build_py

try:
    from setuptools.command.build import build as _build
except ImportError:  # setuptools < 62
    from distutils.command.build import build as _build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = os.path.join(ROOT, "include", "epmoe.h")


def _version():
    """major.minor.patch from the EPMOE_VERSION_* lines of include/epmoe.h (the one source of it)."""
    with open(HEADER) as f:
        text = f.read()
    parts = [re.search(rf"^#define EPMOE_VERSION_{k} (\d+)$", text, re.M) for k in ("MAJOR", "MINOR", "PATCH")]
    if not all(parts):
        raise RuntimeError(f"{HEADER}: no EPMOE_VERSION_MAJOR/MINOR/PATCH lines")
    return ".".join(p.group(1) for p in parts)


VERSION = _version()


def _library():
    """Path of the libepmoe.so to ship: $EPMOE_LIB, or the result of `make lib`."""
    env = os.environ.get("EPMOE_LIB")
    if env:
        if not os.path.isfile(env):
            raise RuntimeError(f"$EPMOE_LIB = {env} is not a file")
        return env
    args = shlex.split(os.environ.get("EPMOE_MAKE_ARGS", ""))
    build_dir = next((a.split("=", 1)[1] for a in args if a.startswith("BUILD=")), "build")
    built = os.path.join(ROOT, build_dir, "libepmoe.so")
    makefile = os.path.join(ROOT, "Makefile")
    if os.path.isfile(makefile) and shutil.which("make"):
        cmd = ["make", "-C", ROOT, "lib"] + args
        print("epmoe: " + " ".join(shlex.quote(c) for c in cmd), flush=True)
        if subprocess.call(cmd) != 0:
            raise RuntimeError("`make lib` failed (see above); set EPMOE_MAKE_ARGS=CUDA=0 for a CPU-only library, "
                               "or EPMOE_LIB to a prebuilt libepmoe.so")
        return built
    if os.path.isfile(built):  # no make here: a build made elsewhere in this tree is all we have
        print(f"epmoe: no make; shipping the existing {built}", flush=True)
        return built
    raise RuntimeError("no libepmoe.so to ship: `make` or the Makefile is missing and there is no build/libepmoe.so; "
                       "set EPMOE_LIB to a prebuilt one")


class BuildPy(_build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install imports python/epmoe, which finds build/libepmoe.so itself
        # Always copied: distutils' copy_file would keep a newer file left by an earlier build
        # (another $EPMOE_LIB or make flags) in the same python/build tree.
        dst = os.path.join(self.build_lib, "epmoe", "libepmoe.so")
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        src = _library()
        shutil.copy2(src, dst)
        print(f"epmoe: shipping {os.path.realpath(src)} as {dst}", flush=True)


class Build(_build):
    def initialize_options(self):
        super().initialize_options()
        self.build_base = os.path.join("python", "build")


try:
    try:
        from setuptools.command.bdist_wheel import bdist_wheel as _bdist_wheel  # setuptools >= 70.1
    except ImportError:
        from wheel.bdist_wheel import bdist_wheel as _bdist_wheel

    class BdistWheel(_bdist_wheel):
        def finalize_options(self):
            # A native library inside: the package belongs in platlib under a platform tag. The
            # install step picks platlib only for distributions that report native code.
            self.distribution.has_ext_modules = lambda: True
            super().finalize_options()
            self.root_is_pure = False

        def get_tag(self):
            _, _, plat = super().get_tag()
            return "py3", "none", plat

except ImportError:
    class BdistWheel(Command):
        """Stands in when neither setuptools >= 70.1 nor `wheel` is installed, to say so as soon as
        setuptools asks for the wheel command (metadata preparation does, before any build)."""
        user_options = []

        def initialize_options(self):
            raise RuntimeError("building the epmoe wheel needs setuptools >= 70.1 or the `wheel` package: "
                               "`pip install wheel`, or let pip build with isolation (drop --no-build-isolation)")

        def finalize_options(self):
            pass

        def run(self):
            pass
