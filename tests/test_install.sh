#!/usr/bin/env bash
# test_install.sh — epmoe as a user installs and builds against it. `make install` into a temporary
# prefix, then tests/install/consumer.c built and run through pkg-config and through CMake's
# find_package (the shared and the static target; version requests the ABI accepts and refuses; the
# installed tree moved elsewhere); a DESTDIR staging install; `make uninstall` leaves no file.
# Run by `make test-install` (part of `make test`), which passes the build directory; the make
# it calls inherits that make's variables (BUILD, CUDA, ...) through MAKEFLAGS.
set -u
BUILD=${1:?usage: tests/test_install.sh BUILD_DIR}
MAKE=${MAKE:-make}
CC=${CC:-cc}
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail=0
bad() { echo "  FAIL $*"; fail=1; }
ok() { echo "  ok   $*"; }
version=$(sed -n 's/^#define EPMOE_VERSION_\(MAJOR\|MINOR\|PATCH\) \([0-9]*\)$/\2/p' "$here/../include/epmoe.h" | paste -sd.)
abi=${version%.*}; [ "${version%%.*}" = 0 ] || abi=${version%%.*}
files="include/epmoe.h lib/libepmoe.a lib/libepmoe.so.$version lib/libepmoe.so.$abi lib/libepmoe.so bin/epmoe
       bin/epmoe-launch lib/pkgconfig/epmoe.pc lib/cmake/epmoe/epmoeConfig.cmake lib/cmake/epmoe/epmoeConfigVersion.cmake"

prefix=$tmp/usr
if ! $MAKE -s install PREFIX="$prefix" >"$tmp/install.log" 2>&1; then
    cat "$tmp/install.log"; echo "test_install: FAIL (make install)"; exit 1
fi
for f in $files; do [ -e "$prefix/$f" ] || bad "make install did not install $f"; done
[ "$(readlink "$prefix/lib/libepmoe.so")" = "libepmoe.so.$abi" ] && [ "$(readlink "$prefix/lib/libepmoe.so.$abi")" = "libepmoe.so.$version" ] \
    && ok "libepmoe.so -> libepmoe.so.$abi -> libepmoe.so.$version" || bad "the shared library's links"
soname=$(readelf -d "$prefix/lib/libepmoe.so.$version" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')
[ "$soname" = "libepmoe.so.$abi" ] && ok "soname $soname" || bad "soname '$soname', want libepmoe.so.$abi"
"$prefix/bin/epmoe" --help >/dev/null 2>&1 && ok "bin/epmoe --help" || bad "bin/epmoe --help"

# pkg-config: the flags a Makefile-built program takes
if command -v pkg-config >/dev/null; then
    export PKG_CONFIG_PATH=$prefix/lib/pkgconfig
    v=$(pkg-config --modversion epmoe)
    [ "$v" = "$version" ] && ok "pkg-config --modversion epmoe: $v" || bad "pkg-config --modversion: '$v', want $version"
    # shellcheck disable=SC2046
    if $CC -std=c99 -Wall -Werror "$here/install/consumer.c" $(pkg-config --cflags --libs epmoe) \
        -Wl,-rpath,"$(pkg-config --variable=libdir epmoe)" -o "$tmp/consumer_pc" 2>"$tmp/cc.log"; then
        out=$("$tmp/consumer_pc") && ok "pkg-config build runs: $out" || bad "pkg-config build: $out"
        readelf -d "$tmp/consumer_pc" | grep -q "NEEDED.*\[libepmoe.so.$abi\]" || bad "the consumer does not need libepmoe.so.$abi"
    else
        cat "$tmp/cc.log"; bad "the consumer does not build with pkg-config's flags"
    fi
    case " $(pkg-config --static --libs epmoe) " in *" -lm "*"-lpthread"*) ok "pkg-config --static lists the static dependencies" ;;
    *) bad "pkg-config --static --libs: no -lm / -lpthread" ;; esac
else
    echo "  SKIP pkg-config is not installed: the pkg-config consumer was not built"
fi

# CMake: find_package(epmoe) with a version request
cmake_build() { # dir, prefix, wanted version; the configure's output in dir.log
    cmake -S "$here/install" -B "$1" -DCMAKE_PREFIX_PATH="$2" -DEPMOE_WANT="$3" -DCMAKE_C_COMPILER="$CC" >"$1.log" 2>&1 &&
        cmake --build "$1" >>"$1.log" 2>&1
}
if command -v cmake >/dev/null; then
    if cmake_build "$tmp/cm" "$prefix" "$version"; then
        for t in shared static; do
            out=$("$tmp/cm/consumer_$t") && ok "CMake epmoe::epmoe$([ $t = static ] && echo _static) runs: $out" || bad "CMake $t: $out"
        done
        readelf -d "$tmp/cm/consumer_static" | grep -q 'NEEDED.*libepmoe' && bad "consumer_static needs libepmoe.so"
    else
        tail -n 20 "$tmp/cm.log"; bad "CMake consumer (find_package(epmoe $version))"
    fi
    cmake_build "$tmp/cm_abi" "$prefix" "$abi" && ok "find_package(epmoe $abi) accepted" || bad "find_package(epmoe $abi) refused"
    major=${version%%.*} minor=$(echo "$version" | cut -d. -f2)
    for want in "$major.$((minor + 1))" "$((major + 1)).0" $([ "$minor" -gt 0 ] && [ "$major" = 0 ] && echo "0.$((minor - 1))"); do
        if cmake_build "$tmp/cm_$want" "$prefix" "$want"; then bad "find_package(epmoe $want) accepted $version"
        elif grep -q "that is compatible" "$tmp/cm_$want.log"; then ok "find_package(epmoe $want) refused"
        else tail -n 20 "$tmp/cm_$want.log"; bad "find_package(epmoe $want) failed for another reason"; fi
    done
    # relocatable: the same tree somewhere else
    cp -a "$prefix" "$tmp/moved"
    if cmake_build "$tmp/cm_moved" "$tmp/moved" "$version" && out=$("$tmp/cm_moved/consumer_shared"); then
        grep -q "$tmp/moved/lib/libepmoe.so" "$tmp/cm_moved/CMakeFiles/consumer_shared.dir/link.txt" &&
            ok "the installed tree moved: found and runs" || bad "moved tree: linked against the old place"
    else
        bad "the moved tree: not found or does not run"
    fi
    rm -rf "$tmp/moved"
else
    echo "  SKIP cmake is not installed: the CMake consumer was not built"
fi

# DESTDIR: a package's staging tree, paths as the final prefix says
if $MAKE -s install DESTDIR="$tmp/stage" PREFIX=/opt/epmoe >"$tmp/stage.log" 2>&1; then
    miss=0; for f in $files; do [ -e "$tmp/stage/opt/epmoe/$f" ] || miss=1; done
    grep -q '^prefix=/opt/epmoe$' "$tmp/stage/opt/epmoe/lib/pkgconfig/epmoe.pc" && [ $miss = 0 ] &&
        ok "DESTDIR staging: every file under DESTDIR/PREFIX, prefix=/opt/epmoe in epmoe.pc" || bad "DESTDIR staging"
else
    cat "$tmp/stage.log"; bad "make install DESTDIR=..."
fi

# uninstall removes every file it installed
$MAKE -s uninstall PREFIX="$prefix" >/dev/null 2>&1 || bad "make uninstall"
left=$(find "$prefix" \( -type f -o -type l \) | sed "s|$prefix/||")
[ -z "$left" ] && ok "make uninstall: no file left" || bad "make uninstall left: $left"

[ $fail = 0 ] && echo "test_install: all passed" || echo "test_install: FAIL"
exit $fail
