"""Response-based knowledge: what the teacher's final outputs (logits) say."""
