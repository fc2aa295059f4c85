"""One primitive per module: tensor-parallel linears, rotary, RMS norm, attention ops, MoE, LoRA hooks."""
