# The two commands: `make run` and `make test`. Both install what is missing,
# configure and build first.
BUILD ?= build
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=

.PHONY: all deps configure build run test bench fuzz clean

all: build

deps:
	@scripts/install-deps.sh

configure: deps
	@cmake -S . -B $(BUILD) -G Ninja $(CMAKE_FLAGS) > $(BUILD).configure.log 2>&1 || (cat $(BUILD).configure.log; exit 1)
	@grep -- "-- switchyard:" $(BUILD).configure.log || true

build: configure
	@cmake --build $(BUILD) -j $(JOBS)

# The main job on the embedded default: ranks as threads in one process. It
# trains the MoE language model for about a minute and saves runs/quickstart;
# then a sample from that checkpoint.
run: build
	$(BUILD)/bin/switchyard run --config configs/quickstart.yaml
	$(BUILD)/bin/switchyard generate --model runs/quickstart --prompt "The meaning of life is" \
	  --max_new_tokens 100 --temperature 0.7 --top_k 20 --seed 1

# The whole suite; tests that need a GPU carry the label "gpu" and are left out here.
test: build
	@echo "ctest: excluding tests labelled gpu (this machine has no GPU)"
	ctest --test-dir $(BUILD) --output-on-failure --label-exclude gpu

# Every parser under libFuzzer with ASan + UBSan (clang), FUZZ_SECONDS per harness; a crashing,
# leaking or slow input lands in $(FUZZ_BUILD)/tests/fuzz/crashers (add it to tests/fuzz/corpus/<harness>/
# and make test replays it from then on). make test runs the same harnesses without clang.
FUZZ_BUILD ?= build-fuzz
FUZZ_SECONDS ?= 60
FUZZ_FLAGS = -fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined
fuzz: deps
	@command -v clang++ > /dev/null || { echo "make fuzz needs clang (apt-get install clang); make test runs the harnesses without it"; exit 1; }
	@cmake -S . -B $(FUZZ_BUILD) -G Ninja -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ -DSWITCHYARD_FUZZ=ON \
	  -DSWITCHYARD_BUILD_BENCH=OFF -DSWITCHYARD_WITH_MPI=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSWITCHYARD_FUZZ_SECONDS=$(FUZZ_SECONDS) \
	  "-DCMAKE_C_FLAGS=$(FUZZ_FLAGS)" "-DCMAKE_CXX_FLAGS=$(FUZZ_FLAGS)" > $(FUZZ_BUILD).configure.log 2>&1 \
	  || (cat $(FUZZ_BUILD).configure.log; exit 1)
	@cmake --build $(FUZZ_BUILD) -j $(JOBS) --target fuzz_yaml_config fuzz_safetensors fuzz_model_config \
	  fuzz_checkpoint_manifest fuzz_routing_trace
	ctest --test-dir $(FUZZ_BUILD) -L fuzz --output-on-failure

bench: build
	bench/compare_alltoall.sh $(BUILD)

clean:
	rm -rf $(BUILD) $(BUILD).configure.log
