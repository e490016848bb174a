"""Language-model distillation, pure PyTorch: token-level divergences on ``(B, L, V)`` logits with a loss mask,
chunked over the sequence, over the teacher's top-k with an explicit rest bucket, on-policy batches (GKD's
lambda) and per-token multi-teacher combination. No Ray, MLflow or config here (the import-linter checks it).
"""
