# The two commands: `make run` and `make test`. Both install what is missing,
# configure and build first.
BUILD ?= build
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=

.PHONY: all deps configure build run test bench clean

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

bench: build
	bench/compare_alltoall.sh $(BUILD)

clean:
	rm -rf $(BUILD) $(BUILD).configure.log
