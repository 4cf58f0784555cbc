# epmoe — one Makefile. `make demo`, `make test` (CPU suite, sanitizers included), `make test-gpu`,
# `make bench-gpu`. CUDA is used when nvcc is found (announced below); CUDA=0 forces the CPU build.

BUILD ?= build
CC ?= cc
PYTHON ?= python3
NVCC ?= $(shell command -v nvcc 2>/dev/null)
CUDA ?= $(if $(NVCC),1,0)
ifeq ($(CUDA),1)
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(realpath $(NVCC)))
endif
# NCCL (headers and libnccl from the CUDA toolkit): the EP backend on GPUs. The device API must
# run against the libnccl it was compiled with (see scripts/gpu_suite.sh for LD_LIBRARY_PATH).
NCCL_HOME ?= $(CUDA_HOME)
NCCL ?= $(if $(and $(filter 1,$(CUDA)),$(wildcard $(NCCL_HOME)/include/nccl_device.h)),1,0)
# Hopper only: wgmma and FP8 tensor-core paths need the sm_90a target.
CUDA_ARCH ?= -gencode arch=compute_90a,code=sm_90a

VERSION := $(shell sed -n 's/^\#define EPMOE_VERSION_\(MAJOR\|MINOR\|PATCH\) \([0-9]*\)$$/\2/p' include/epmoe.h | paste -sd.)
# The ABI version in the soname: the major, or major.minor while the major is 0 (0.x releases
# change structs, e.g. epmoe_layer_weights in 0.3 and the W4A8 weight scales in 0.4, so 0.3 and
# 0.4 must not resolve to each other).
SONAME_MAJOR := $(firstword $(subst ., ,$(VERSION)))
SONAME_ABI := $(if $(filter 0,$(SONAME_MAJOR)),$(SONAME_MAJOR).$(word 2,$(subst ., ,$(VERSION))),$(SONAME_MAJOR))

WARN := -Wall -Wextra -Wshadow -Wstrict-prototypes -Wmissing-prototypes -Wconversion -Wno-sign-conversion
# -ffp-contract=off: the CPU references must not fuse multiply-adds the kernels keep separate.
CFLAGS ?= -O2 -g
CFLAGS += -std=c11 $(WARN) -fPIC -fvisibility=hidden -ffp-contract=off -Iinclude -Isrc -DEPMOE_HAVE_CUDA=$(CUDA) -DEPMOE_HAVE_NCCL=$(NCCL)
NVFLAGS ?= -O3 -lineinfo
NVFLAGS += -std=c++17 $(CUDA_ARCH) -Xcompiler -fPIC,-fvisibility=hidden,-fvisibility-inlines-hidden -Iinclude -Isrc -DEPMOE_HAVE_CUDA=1 \
	-DEPMOE_HAVE_NCCL=$(NCCL)
LDLIBS := -lm -lpthread
ifeq ($(CUDA),1)
# cudart linked statically: the library then loads on machines with only the driver.
LDLIBS += -L$(CUDA_HOME)/lib64 -lcudart_static -ldl -lrt -lstdc++
endif
ifeq ($(NCCL),1)
LDLIBS := -L$(NCCL_HOME)/lib64 -Wl,-rpath,$(NCCL_HOME)/lib64 -lnccl $(LDLIBS)
endif

LIB_C := src/status.c src/format.c src/quant_args.c src/ref/quant_ref.c src/w4a8.c src/experts.c src/layer.c src/cuda_none.c \
	src/ep/ep.c src/ep/ep_cpu.c src/ep/ep_ref.c src/ep/ep_launch.c
LIB_CU := $(if $(filter 1,$(CUDA)),$(wildcard src/cuda/*.cu)) $(if $(filter 1,$(NCCL)),$(wildcard src/ep/*.cu))
LIB_OBJ := $(LIB_C:%.c=$(BUILD)/obj/%.o) $(LIB_CU:%.cu=$(BUILD)/obj/%.o)
# what make install adds beside the libraries (pkg/*.in, filled in by the build)
PKG_FILES := epmoe.pc epmoeConfig.cmake epmoeConfigVersion.cmake
HEADERS := include/epmoe.h $(wildcard src/*.h src/ep/*.h src/ep/*.cuh src/cuda/*.cuh)

CPU_TESTS := test_format test_quant test_ep test_w4a8 test_experts test_launch test_layer
ASAN := $(BUILD)/asan
SANFLAGS := -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer

.DELETE_ON_ERROR:
.PHONY: FORCE dev-labs dev-trace gpu-build all lib demo install uninstall test-install test test-c test-asan test-python test-cli check-header check-symbols test-gpu bench-gpu gpu-suite clean info
all: lib $(BUILD)/epmoe

info:
ifeq ($(CUDA),1)
	@echo "✓ nvcc found ($(NVCC)): building CUDA kernels for sm_90a"
else
	@echo "✗ nvcc not found (or CUDA=0): CPU-only build, GPU entry points return EPMOE_ERR_UNSUPPORTED"
endif
ifeq ($(NCCL),1)
	@echo "✓ NCCL device API found ($(NCCL_HOME)): building the GPU EP backend"
else
	@echo "✗ NCCL device API not found (or NCCL=0): EP runs on the CPU backend only"
endif

lib: info $(BUILD)/libepmoe.a $(BUILD)/libepmoe.so $(PKG_FILES:%=$(BUILD)/pkg/%)

# What the objects were built with, rewritten only when it changes: switching CUDA=0/1 (or the
# flags) rebuilds them, instead of linking a CUDA build's objects into a CPU-only library.
BUILD_CONFIG := CUDA=$(CUDA) NCCL=$(NCCL) CC=$(CC) CFLAGS=$(CFLAGS) NVFLAGS=$(NVFLAGS)
$(BUILD)/build-config: FORCE
	@mkdir -p $(BUILD)
	@echo '$(BUILD_CONFIG)' | cmp -s - $@ || echo '$(BUILD_CONFIG)' > $@
FORCE:

$(BUILD)/obj/%.o: %.c $(HEADERS) $(BUILD)/build-config
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/obj/%.o: %.cu $(HEADERS) $(BUILD)/build-config
	@mkdir -p $(dir $@)
	$(NVCC) $(NVFLAGS) -c $< -o $@

$(BUILD)/libepmoe.a: $(LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/libepmoe.so: $(LIB_OBJ)
	$(CC) -shared -Wl,--no-undefined -Wl,-soname,libepmoe.so.$(SONAME_ABI) -o $@ $^ $(LDLIBS)
	ln -sf libepmoe.so $(BUILD)/libepmoe.so.$(SONAME_ABI)

# ---- CLI -----------------------------------------------------------------------------------
CLI_SRC := tools/epmoe.c tools/demo_ep.c tools/demo_w4a8.c tools/cli_layer.c
$(BUILD)/epmoe: $(CLI_SRC) tools/tool_util.h $(BUILD)/libepmoe.a $(HEADERS)
	$(CC) $(CFLAGS) $(if $(filter 1,$(CUDA)),-isystem $(CUDA_HOME)/include) -o $@ $(CLI_SRC) \
		$(BUILD)/libepmoe.a $(LDLIBS)

# NCCL's device API needs the libnccl it was compiled against; on the H200 image that is torch's
# wheel (the system one is older). Prepended when present; elsewhere this is empty.
NCCL_RUNTIME_DIR ?= $(firstword $(wildcard /opt/torch/.venv/lib/python3.*/site-packages/nvidia/nccl/lib))
demo: lib $(BUILD)/epmoe
	LD_LIBRARY_PATH=$(NCCL_RUNTIME_DIR)$${LD_LIBRARY_PATH:+:$$LD_LIBRARY_PATH} NCCL_NVLS_ENABLE=0 ./$(BUILD)/epmoe demo

# ---- install: the header, both libraries, the CLI and launcher, pkg-config and CMake files -----
# make && make install [PREFIX=/usr/local] [DESTDIR=staging]; make uninstall with the same arguments.
# install only copies what the build made (it never builds: under sudo nvcc may be off the PATH, and
# a rebuild would then install a CPU-only library); the package files' link flags are the build's,
# written with it. The shared library goes in as libepmoe.so.$(VERSION) with the soname and dev links.
PREFIX ?= /usr/local
VERSION_MAJOR := $(word 1,$(subst ., ,$(VERSION)))
VERSION_MINOR := $(word 2,$(subst ., ,$(VERSION)))
INSTALLED := include/epmoe.h lib/libepmoe.a lib/libepmoe.so.$(VERSION) lib/libepmoe.so.$(SONAME_ABI) lib/libepmoe.so \
	bin/epmoe bin/epmoe-launch lib/pkgconfig/epmoe.pc lib/cmake/epmoe/epmoeConfig.cmake \
	lib/cmake/epmoe/epmoeConfigVersion.cmake
space := $(subst ,, )
sed_escape = $(subst |,\|,$(subst &,\&,$(subst \,\\,$(1))))
# everything but @PREFIX@, which install fills in
$(BUILD)/pkg/%: pkg/%.in $(BUILD)/build-config include/epmoe.h Makefile
	@mkdir -p $(dir $@)
	@sed -e 's|@VERSION@|$(VERSION)|g' -e 's|@SONAME_ABI@|$(SONAME_ABI)|g' -e 's|@VERSION_MAJOR@|$(VERSION_MAJOR)|g' \
		-e 's|@VERSION_MINOR@|$(VERSION_MINOR)|g' -e 's|@CUDA@|$(CUDA)|g' -e 's|@NCCL@|$(NCCL)|g' \
		-e 's|@LIBS_PRIVATE@|$(strip $(LDLIBS))|g' -e 's|@LIBS_PRIVATE_CMAKE@|$(subst $(space),;,$(strip $(LDLIBS)))|g' $< > $@
D := $(DESTDIR)$(PREFIX)
install:
	@for f in libepmoe.a libepmoe.so epmoe $(PKG_FILES:%=pkg/%); do [ -e "$(BUILD)/$$f" ] || \
		{ echo "make install: $(BUILD)/$$f is missing: run make first (install only copies the build)"; exit 1; }; done
	install -d "$(D)/include" "$(D)/lib/pkgconfig" "$(D)/lib/cmake/epmoe" "$(D)/bin"
	install -m 644 include/epmoe.h "$(D)/include/"
	install -m 644 "$(BUILD)/libepmoe.a" "$(D)/lib/"
	install -m 755 "$(BUILD)/libepmoe.so" "$(D)/lib/libepmoe.so.$(VERSION)"
	ln -sf libepmoe.so.$(VERSION) "$(D)/lib/libepmoe.so.$(SONAME_ABI)"
	ln -sf libepmoe.so.$(SONAME_ABI) "$(D)/lib/libepmoe.so"
	install -m 755 "$(BUILD)/epmoe" tools/epmoe-launch "$(D)/bin/"
	sed 's|@PREFIX@|$(call sed_escape,$(PREFIX))|g' "$(BUILD)/pkg/epmoe.pc" > "$(D)/lib/pkgconfig/epmoe.pc"
	install -m 644 "$(BUILD)/pkg/epmoeConfig.cmake" "$(BUILD)/pkg/epmoeConfigVersion.cmake" "$(D)/lib/cmake/epmoe/"

uninstall:
	for f in $(INSTALLED); do rm -f "$(D)/$$f"; done
	rmdir "$(D)/lib/cmake/epmoe" 2>/dev/null || true

# A consumer built against an install in a temporary prefix, through pkg-config and through CMake
# (the script's make inherits this one's variables: BUILD, CUDA, ...).
test-install: lib $(BUILD)/epmoe
	CC="$(CC)" bash tests/test_install.sh $(BUILD)

# ---- CPU tests -------------------------------------------------------------------------------
$(BUILD)/tests/%: tests/%.c tests/test.h tests/ep_common.h tests/w4a8_common.h tests/experts_common.h tests/layer_common.h $(BUILD)/libepmoe.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Wno-conversion -o $@ $< $(BUILD)/libepmoe.a $(LDLIBS)

# The sanitized build is CPU-only (ASan and the CUDA runtime do not mix) and its own tree.
$(ASAN)/tests/%: tests/%.c tests/test.h tests/ep_common.h tests/w4a8_common.h tests/experts_common.h tests/layer_common.h $(LIB_C) $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(filter-out -DEPMOE_HAVE_CUDA=% -DEPMOE_HAVE_NCCL=%,$(CFLAGS)) -DEPMOE_HAVE_CUDA=0 -DEPMOE_HAVE_NCCL=0 \
		-Wno-conversion $(SANFLAGS) -O1 \
		-o $@ $< $(LIB_C) -lm -lpthread

test-c: $(CPU_TESTS:%=$(BUILD)/tests/%)
	@for t in $(CPU_TESTS); do echo "== $$t"; ./$(BUILD)/tests/$$t || exit 1; done

# allocator_may_return_null: the out-of-memory paths are tested (a huge allocation gets NULL, not an abort)
test-asan: $(CPU_TESTS:%=$(ASAN)/tests/%)
	@for t in $(CPU_TESTS); do echo "== $$t (ASan+UBSan, quick sweep)"; EPMOE_TEST_QUICK=1 ASAN_OPTIONS=allocator_may_return_null=1$${ASAN_OPTIONS:+:$$ASAN_OPTIONS} ./$(ASAN)/tests/$$t || exit 1; done

check-header:
	@mkdir -p $(BUILD)
	$(CC) -std=c11 -pedantic -Wall -Wextra -Werror -Iinclude -fsyntax-only -x c tests/header_only.c
	$(CC) -std=c99 -pedantic -Wall -Wextra -Werror -Iinclude -fsyntax-only -x c tests/header_only.c
	c++ -std=c++11 -pedantic -Wall -Wextra -Werror -Iinclude -fsyntax-only -x c++ tests/header_only.c

check-symbols: $(BUILD)/libepmoe.so
	@bad=$$(nm -D --defined-only $(BUILD)/libepmoe.so | awk '$$2 ~ /[TDBRWVu]/ {print $$3}' | grep -v '^epmoe_' || true); \
	if [ -n "$$bad" ]; then echo "exported non-epmoe_ symbols:"; echo "$$bad"; exit 1; fi; \
	echo "check-symbols: only epmoe_* exported ($$(nm -D --defined-only $(BUILD)/libepmoe.so | grep -c ' T epmoe_') functions)"

test-cli: $(BUILD)/epmoe
	bash tests/test_cli.sh $(BUILD)/epmoe

test-python: $(BUILD)/libepmoe.so
	EPMOE_LIB=$(abspath $(BUILD)/libepmoe.so) $(PYTHON) -m pytest -q python/tests

# CI has nvcc but no GPU: every .cu (library, GPU tests, labs, benchmarks) is compiled, none is run.
COMPILE_GPU := $(if $(filter 1,$(CUDA)),gpu-build)
test: lib check-header check-symbols $(COMPILE_GPU) test-c test-asan test-python test-cli test-install
	@echo "make test: all CPU suites passed$(if $(COMPILE_GPU), (and every CUDA source compiled))"

# ---- GPU (H200): tests, benchmarks, the whole suite in one call ------------------------------
GPU_TESTS := test_quant_gpu test_w4a8_gpu test_experts_gpu $(if $(filter 1,$(NCCL)),test_ep_gpu test_layer_gpu)
$(BUILD)/tests/gpu/%: tests/gpu/%.c tests/test.h src/par_for.h tests/ep_common.h tests/w4a8_common.h tests/experts_common.h tests/layer_common.h tests/gpu/cuda_check.h $(BUILD)/libepmoe.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Wno-conversion -isystem $(CUDA_HOME)/include -o $@ $< $(BUILD)/libepmoe.a $(LDLIBS)

$(BUILD)/bench/%: bench/%.cu bench/bench_check.h bench/bench_hold.cuh $(BUILD)/libepmoe.a $(HEADERS)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVFLAGS) -o $@ $< $(BUILD)/libepmoe.a -lnccl -lpthread

$(BUILD)/tests/gpu/%: tests/gpu/%.cu tests/test.h
	@mkdir -p $(dir $@)
	$(NVCC) $(NVFLAGS) -o $@ $<

# cuBLAS/cuBLASLt: the anchors of the W4A8 benchmark (same shapes, same run).
$(BUILD)/bench/bench_w4a8: bench/bench_w4a8.cu bench/bench_check.h bench/bench_hold.cuh $(BUILD)/libepmoe.a $(HEADERS)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVFLAGS) -o $@ $< $(BUILD)/libepmoe.a -lcublasLt -lcublas $(if $(filter 1,$(NCCL)),-lnccl) -lpthread

GPU_BENCH := $(BUILD)/bench/bench_w4a8 $(if $(filter 1,$(NCCL)),$(BUILD)/bench/bench_ep)
gpu-build: lib $(BUILD)/epmoe $(GPU_TESTS:%=$(BUILD)/tests/gpu/%) $(BUILD)/tests/gpu/fp8_exhaustive dev-labs $(GPU_BENCH)

test-gpu: gpu-build
	EPMOE_SUITE=tests bash scripts/gpu_suite.sh

bench-gpu: gpu-build
	EPMOE_SUITE=bench bash scripts/gpu_suite.sh

gpu-suite: gpu-build
	bash scripts/gpu_suite.sh

clean:
	rm -rf $(BUILD)

# ---- kernel labs (dev/): variants with their own main, never linked into the library ---------
# (ep_* labs compile the EP kernels, which need NCCL's device headers)
DEV_LABS := $(patsubst dev/cuda/%.cu,$(BUILD)/dev/%,$(filter-out $(if $(filter 1,$(NCCL)),,dev/cuda/ep_%),$(wildcard dev/cuda/*.cu)))
$(BUILD)/dev/%: dev/cuda/%.cu $(BUILD)/libepmoe.a $(HEADERS)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVFLAGS) -o $@ $< $(BUILD)/libepmoe.a

dev-labs: $(DEV_LABS)

# bench_ep and bench_w4a8 with the kernels' time stamps compiled in (EPMOE_EP_TRACE,
# EPMOE_W4A8_TRACE): a separate build tree, so the library itself never carries them. Prints where
# each EP kernel's time goes, and when the W4A8 GEMM's CTAs ran.
dev-trace:
	NVFLAGS="-O3 -lineinfo -DEPMOE_EP_TRACE -DEPMOE_W4A8_TRACE" $(MAKE) BUILD=$(BUILD)/trace \
		$(BUILD)/trace/bench/bench_ep $(BUILD)/trace/bench/bench_w4a8
