"""The names LoRA adapters target, relative to a decoder layer (PEFT's module names, as LoRAX's target map
uses them). The model module re-exports them; the adapters' loaders and stacks read them from here, so
nothing below the models imports the model."""

ATTN_Q_PROJ = "self_attn.q_proj"
ATTN_K_PROJ = "self_attn.k_proj"
ATTN_V_PROJ = "self_attn.v_proj"
ATTN_O_PROJ = "self_attn.o_proj"
LM_HEAD = "lm_head"
ROUTER = "block_sparse_moe.gate"
# Upstream's names for the experts' linears (per-expert LoRA targets are "experts.w13"/"experts.w2" here).
MOE_W1 = "moe.w1"
MOE_W2 = "moe.w2"
MOE_W3 = "moe.w3"
LM_HEAD_LAYER_ID = -1  # lm_head is not in a decoder layer
ATTN_QKV = (ATTN_Q_PROJ, ATTN_K_PROJ, ATTN_V_PROJ)  # computed in one matmul, so their LoRA is applied together
LORA_TARGET_GROUPS = (ATTN_QKV,)
