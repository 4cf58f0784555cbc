#!/usr/bin/env bash
# Packs the GPU binaries into one gzip archive, build/carry.tgz, for the device machine: its carry
# limit is 64 MiB and the statically linked binaries take ~100 MB (~4x less gzipped: the fatbins
# repeat). Usage, here after make gpu-build (and scripts/ab_build.sh): scripts/pack_build.sh
# [PATH...] (default: the library, the CLI, the GPU tests, the benches, build/ab); on the device:
# tar -xzf build/carry.tgz (then scripts/gpu_suite.sh, or the A/B binaries under build/ab/).
set -eu
cd "$(dirname "$0")/.."
paths=${*:-libepmoe.so epmoe tests/gpu bench ab}
have=()
for p in $paths; do [ -e "build/$p" ] && have+=("build/$p"); done
tar -czf build/carry.tgz "${have[@]}"
echo "build/carry.tgz: $(du -h build/carry.tgz | cut -f1) (${have[*]}); carry it, then tar -xzf build/carry.tgz"
