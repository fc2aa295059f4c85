"""LoRAX's shard protocol (generate.v1). The stubs are generated from generate.proto by `make proto`."""
