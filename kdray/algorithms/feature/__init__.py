"""Feature-based knowledge: matching intermediate activations (hints)."""
