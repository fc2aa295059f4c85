"""lorax_server: the Mixtral mixture-of-experts model for LoRAX, and the small runtime that serves it."""
