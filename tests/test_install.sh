#!/usr/bin/env bash
# test_install.sh — epmoe as a user installs and builds against it. `make install` of BUILD_DIR into
# a temporary prefix; tests/install/consumer.c built and run through pkg-config (shared, and static
# from Libs.private) and through CMake's find_package (both imported targets; versions and ranges
# the ABI rule accepts and refuses; the installed tree moved to a path with a space and an '&'); a
# DESTDIR staging install; install refusing a missing build; `make uninstall` leaves no file.
# Run by `make test-install` (part of `make test`); the make it calls gets BUILD=BUILD_DIR and
# inherits the caller's other variables (CUDA, ...) through MAKEFLAGS. A missing pkg-config or
# cmake is a SKIP, named in the last line.
set -u
BUILD=${1:?usage: tests/test_install.sh BUILD_DIR}
MAKE=${MAKE:-make}
CC=${CC:-cc}
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail=0 skipped=""
bad() { echo "  FAIL $*"; fail=1; }
ok() { echo "  ok   $*"; }
inst() { $MAKE -s "$@" BUILD="$BUILD" DESTDIR= ; } # make install / uninstall of this build
version=$(sed -n 's/^#define EPMOE_VERSION_\(MAJOR\|MINOR\|PATCH\) \([0-9]*\)$/\2/p' "$here/../include/epmoe.h" | paste -sd.)
major=${version%%.*} minor=$(echo "$version" | cut -d. -f2)
abi=$major; [ "$major" = 0 ] && abi=$major.$minor
files="include/epmoe.h lib/libepmoe.a lib/libepmoe.so.$version lib/libepmoe.so.$abi lib/libepmoe.so bin/epmoe
       bin/epmoe-launch lib/pkgconfig/epmoe.pc lib/cmake/epmoe/epmoeConfig.cmake lib/cmake/epmoe/epmoeConfigVersion.cmake"
all_there() { for f in $files; do [ -e "$1/$f" ] || { echo "  (missing: $1/$f)"; return 1; }; done; }
none_left() { [ -d "$1" ] && [ -z "$(find "$1" \( -type f -o -type l \))" ]; }

prefix=$tmp/usr
if ! inst install PREFIX="$prefix" >"$tmp/install.log" 2>&1; then
    cat "$tmp/install.log"; echo "test_install: FAIL (make install)"; exit 1
fi
all_there "$prefix" && ok "make install: every file" || bad "make install left files out"
cmp -s "$BUILD/libepmoe.so" "$prefix/lib/libepmoe.so.$version" && cmp -s "$BUILD/libepmoe.a" "$prefix/lib/libepmoe.a" &&
    ok "the installed libraries are $BUILD's" || bad "the installed libraries are not $BUILD's"
[ "$(readlink "$prefix/lib/libepmoe.so")" = "libepmoe.so.$abi" ] && [ "$(readlink "$prefix/lib/libepmoe.so.$abi")" = "libepmoe.so.$version" ] &&
    ok "libepmoe.so -> libepmoe.so.$abi -> libepmoe.so.$version" || bad "the shared library's links"
soname=$(readelf -d "$prefix/lib/libepmoe.so.$version" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')
[ "$soname" = "libepmoe.so.$abi" ] && ok "soname $soname" || bad "soname '$soname', want libepmoe.so.$abi"
"$prefix/bin/epmoe" --help >/dev/null 2>&1 && ok "bin/epmoe --help" || bad "bin/epmoe --help"

# pkg-config: the flags a Makefile-built program takes
if command -v pkg-config >/dev/null; then
    export PKG_CONFIG_PATH=$prefix/lib/pkgconfig
    v=$(pkg-config --modversion epmoe)
    [ "$v" = "$version" ] && ok "pkg-config --modversion epmoe: $v" || bad "pkg-config --modversion: '$v', want $version"
    libdir=$(pkg-config --variable=libdir epmoe)
    [ "$libdir" = "$prefix/lib" ] || bad "pkg-config libdir '$libdir', want $prefix/lib"
    # shellcheck disable=SC2046
    if $CC -std=c99 -Wall -Werror "$here/install/consumer.c" $(pkg-config --cflags --libs epmoe) -Wl,-rpath,"$libdir" \
        -o "$tmp/consumer_pc" 2>"$tmp/cc.log"; then
        out=$("$tmp/consumer_pc") && ok "pkg-config, shared: $out" || bad "pkg-config, shared: $out"
        readelf -d "$tmp/consumer_pc" | grep -q "NEEDED.*\[libepmoe.so.$abi\]" || bad "the consumer does not need libepmoe.so.$abi"
    else
        cat "$tmp/cc.log"; bad "the consumer does not build with pkg-config's flags"
    fi
    # static: the archive and what Libs.private says it links
    # shellcheck disable=SC2046
    if $CC -std=c99 -Wall -Werror "$here/install/consumer.c" $(pkg-config --cflags epmoe) "$libdir/libepmoe.a" \
        $(pkg-config --static --libs epmoe | sed 's/ -lepmoe / /; s/^-lepmoe //') -o "$tmp/consumer_pc_static" 2>"$tmp/cc.log"; then
        out=$("$tmp/consumer_pc_static") && ok "pkg-config, static (Libs.private): $out" || bad "pkg-config, static: $out"
        readelf -d "$tmp/consumer_pc_static" | grep -q 'NEEDED.*libepmoe' && bad "the static consumer needs libepmoe.so"
    else
        cat "$tmp/cc.log"; bad "the consumer does not link statically with Libs.private"
    fi
else
    echo "  SKIP pkg-config is not installed: the pkg-config consumers were not built"; skipped="$skipped pkg-config"
fi

# CMake: find_package(epmoe) with a version request or range
cmake_build() { # dir, prefix, wanted version; the configure's output in dir.log
    cmake -S "$here/install" -B "$1" -DCMAKE_PREFIX_PATH="$2" -DEPMOE_WANT="$3" -DCMAKE_C_COMPILER="$CC" >"$1.log" 2>&1 &&
        cmake --build "$1" >>"$1.log" 2>&1
}
refused() { # want: find_package(epmoe want) must fail for the version, not for another reason
    if cmake_build "$tmp/cm_r" "$prefix" "$1"; then bad "find_package(epmoe $1) accepted $version"
    elif grep -q "that is compatible" "$tmp/cm_r.log"; then ok "find_package(epmoe $1) refused"
    else tail -n 20 "$tmp/cm_r.log"; bad "find_package(epmoe $1) failed for another reason"; fi
    rm -rf "$tmp/cm_r" "$tmp/cm_r.log"
}
accepted() {
    cmake_build "$tmp/cm_a" "$prefix" "$1" && ok "find_package(epmoe $1) accepted" || { tail -n 20 "$tmp/cm_a.log"; bad "find_package(epmoe $1) refused"; }
    rm -rf "$tmp/cm_a" "$tmp/cm_a.log"
}
if command -v cmake >/dev/null; then
    if cmake_build "$tmp/cm" "$prefix" "$version"; then
        for t in shared static; do
            out=$("$tmp/cm/consumer_$t") && ok "CMake epmoe::epmoe$([ $t = static ] && echo _static): $out" || bad "CMake $t: $out"
        done
        readelf -d "$tmp/cm/consumer_static" | grep -q 'NEEDED.*libepmoe' && bad "consumer_static needs libepmoe.so"
    else
        tail -n 20 "$tmp/cm.log"; bad "CMake consumer (find_package(epmoe $version))"
    fi
    accepted ""; accepted "$abi"; accepted "$major.$minor...$major.$((minor + 2))"
    accepted "$major...$((major + 1))"
    refused "$major.$((minor + 1))"; refused "$((major + 1)).0"
    [ "$major" = 0 ] && [ "$minor" -gt 0 ] && refused "0.$((minor - 1))"
    refused "0...<$version"; refused "$((major + 1)).0...$((major + 2)).0"
    # relocatable: the same tree at another path, with a space and an '&' in it
    moved="$tmp/moved dir & co"
    cp -a "$prefix" "$moved"
    if cmake_build "$tmp/cm_moved" "$moved" "$version" && out=$("$tmp/cm_moved/consumer_shared"); then
        grep -qF "$moved/lib/libepmoe.so" "$tmp/cm_moved/CMakeFiles/consumer_shared.dir/link.txt" &&
            ok "the installed tree moved (a space and an '&' in its path): found, runs" || bad "moved tree: linked against the old place"
    else
        tail -n 20 "$tmp/cm_moved.log"; bad "the moved tree: not found or does not run"
    fi
    rm -rf "$moved"
else
    echo "  SKIP cmake is not installed: the CMake consumers were not built"; skipped="$skipped cmake"
fi

# DESTDIR: a package's staging tree, paths as the final prefix says
if $MAKE -s install BUILD="$BUILD" DESTDIR="$tmp/stage" PREFIX=/opt/epmoe >"$tmp/stage.log" 2>&1; then
    all_there "$tmp/stage/opt/epmoe" && grep -q '^prefix=/opt/epmoe$' "$tmp/stage/opt/epmoe/lib/pkgconfig/epmoe.pc" &&
        ok "DESTDIR staging: every file under DESTDIR/PREFIX, prefix=/opt/epmoe in epmoe.pc" || bad "DESTDIR staging"
    $MAKE -s uninstall BUILD="$BUILD" DESTDIR="$tmp/stage" PREFIX=/opt/epmoe >/dev/null 2>&1
    none_left "$tmp/stage/opt/epmoe" && ok "make uninstall DESTDIR=...: no file left" || bad "make uninstall with DESTDIR"
else
    cat "$tmp/stage.log"; bad "make install DESTDIR=..."
fi

# a PREFIX with a space and an '&': every file, the .pc says it literally, uninstall takes them all
odd="$tmp/odd prefix & co"
if inst install PREFIX="$odd" >"$tmp/odd.log" 2>&1 && all_there "$odd" &&
    grep -qxF "prefix=$odd" "$odd/lib/pkgconfig/epmoe.pc"; then
    inst uninstall PREFIX="$odd" >/dev/null 2>&1
    none_left "$odd" && ok "PREFIX with a space and an '&': installed, named in epmoe.pc, uninstalled" || bad "uninstall of an odd PREFIX"
else
    cat "$tmp/odd.log"; bad "install into a PREFIX with a space and an '&'"
fi

# install only copies: no build, no install (and no file written)
if $MAKE -s install BUILD="$tmp/no-build" DESTDIR= PREFIX="$tmp/never" >"$tmp/nb.log" 2>&1; then
    bad "make install of a missing build succeeded"
else
    grep -q "run make first" "$tmp/nb.log" && [ ! -e "$tmp/never" ] && [ ! -e "$tmp/no-build" ] &&
        ok "make install of a missing build: refused, nothing built or written" || { cat "$tmp/nb.log"; bad "install of a missing build"; }
fi

# uninstall removes every file it installed
inst uninstall PREFIX="$prefix" >/dev/null 2>&1 || bad "make uninstall"
none_left "$prefix" && ok "make uninstall: no file left" || bad "make uninstall left: $(find "$prefix" \( -type f -o -type l \) 2>&1)"

if [ $fail != 0 ]; then echo "test_install: FAIL"
elif [ -n "$skipped" ]; then echo "test_install: all run passed (SKIPPED:$skipped)"
else echo "test_install: all passed"; fi
exit $fail
