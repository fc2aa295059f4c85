# `make test` and `make run` work on a fresh machine: each creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch that lies on disk on these machines; installed first so that the package's
# torch range is already satisfied and pip does not pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: test run bench test-gpu proto clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

run: $(STAMP)
	$(BIN)/lorax-server generate --max-new-tokens 24 --prompt "The for statement" --prompt "A list is"
	$(BIN)/lorax-server demo

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q tests/gpu

# On a GPU machine; the two-GPU benchmark runs when the machine has two GPUs (NVLink multicast stays off).
# bench.serve (serving throughput and latency through the engine) takes about 4 minutes, 3 more with adapters;
# `python -m bench.serve --smoke` runs it on the CPU with the embedded tiny model (tests/bench).
bench: $(STAMP)
	$(BIN)/python -m bench.moe_layer
	$(BIN)/python -m bench.moe_layer --fp8
	$(BIN)/python -m bench.fp8_linear
	$(BIN)/python -m bench.paged_attention
	$(BIN)/python -m bench.prefill_attention
	$(BIN)/python -m bench.prefill
	$(BIN)/python -m bench.layer_stack
	$(BIN)/python -m bench.layer_stack --fp8 --batches 1 64
	$(BIN)/python -m bench.adapters
	$(BIN)/python -m bench.engine_step
	$(BIN)/python -m bench.grammar --model-ms 30
	$(BIN)/python -m bench.serve
	$(BIN)/python -m bench.serve --adapters 64 --shapes 128x128
	$(BIN)/python -m bench.serve --shapes 128x128 --long-prompt 16384 --structured 64 --prefix 2000
	$(BIN)/python -m bench.serve --fp8 --adapters 64 --shapes 128x128
	$(BIN)/python -m bench.engine_step --batches 64 --kv-fp8
	if [ "$$($(BIN)/python -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then \
	  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
	  $(BIN)/python -m torch.distributed.run --standalone --nproc-per-node 2 -m bench.tp_nccl; fi

# Regenerates lorax_server/pb/generate_pb2*.py from generate.proto (grpcio-tools).
proto: $(STAMP)
	$(BIN)/pip install -q grpcio-tools
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. lorax_server/pb/generate.proto

clean:
	rm -rf $(VENV) build *.egg-info
