"""The engine's parts below the request bookkeeping: batched sampling (`sampler`) and text (`text`)."""
