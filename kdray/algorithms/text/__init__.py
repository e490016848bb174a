"""Text knowledge: terms for transformer encoders (DistilBERT, BERT-PKD, TinyBERT, MiniLM, MiniLMv2).

They read the feature points of :mod:`kdray.algorithms.text.contract` (hidden states, attention probabilities,
Q / K / V projections by layer) and carry ``modality = "text"``, so the image method harness skips them.
"""
