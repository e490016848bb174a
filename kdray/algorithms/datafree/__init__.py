"""Data-free distillation's parts in pure PyTorch: the generator that replaces the training images, and the
losses it (and the student) are trained with (DAFL, DFAD / ZSKT, DeepInversion). The schemes that put them in a
training step are the orchestrator's (issue 13); these are the mathematics, tested against hand-computed values."""
