"""Tang, Lu, Liu, Mou, Vechtomova, Lin, "Distilling Task-Specific Knowledge from BERT into Simple Neural
Networks" (2019): the distilled BiLSTM student, ``text_bilstm``.

Word embeddings, one bidirectional LSTM layer, the concatenation of the forward direction's last state and the
backward direction's first state (each read at the sequence's real ends: padded positions are packed away),
a ReLU layer and a linear classifier. Defaults are the paper's single-sentence (SST-2) sizes as we read them:
300-d embeddings (the paper initialises them from word2vec; kdray starts them at random, or from whatever the
caller copies in), 150 hidden units per direction, a 200-unit ReLU layer. ``vocab_size`` must be the teacher
tokenizer's (30522 for BERT's uncased WordPiece), so the student reads the same token ids as its teacher.

It is called like a transformer text model, ``model(input_ids=..., attention_mask=...)`` (right padding;
``token_type_ids`` is accepted and ignored, a single-sentence model), so a text batch (a mapping of tensors)
serves teacher and student alike. The paper's loss regresses the teacher's logits, ``alpha CE + (1 - alpha)
||z_t - z_s||^2``: kdray's ``logit_matching`` term (``1/2 ||z_s - z_t||^2`` summed over classes) beside the
distiller's CE, i.e. ``methods: [{name: logit_matching, weight: 2 * (1 - alpha)}]`` with ``ce_weight: alpha``. It exposes ``embedding``
(the BiLSTM encoding, ``kd_embedding``) but no transformer layers, so the layer-wise text terms refuse it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence

from kdray.models.registry import register_model


class TextBiLSTM(nn.Module):
    def __init__(self, num_classes: int, vocab_size: int, embedding_dim: int, hidden_size: int, mlp_size: int,
                 padding_idx: int):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, embedding_dim, padding_idx=padding_idx)
        self.lstm = nn.LSTM(embedding_dim, hidden_size, batch_first=True, bidirectional=True)
        self.embedding = nn.Identity()
        self.mlp = nn.Sequential(nn.Linear(2 * hidden_size, mlp_size), nn.ReLU())
        self.head = nn.Linear(mlp_size, num_classes)
        self.kd_embedding = "embedding"
        self.kd_stages = ["embedding"]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            lengths = torch.full((input_ids.shape[0],), input_ids.shape[1], dtype=torch.long)
        else:
            mask = attention_mask.long()
            if not torch.equal(mask.cummin(dim=1).values, mask):
                raise ValueError("text_bilstm expects right-padded inputs (attention_mask 1...1 0...0 per row); "
                                 "tokenise with padding_side='right'")
            lengths = mask.sum(1).clamp_min(1).cpu()
        packed = pack_padded_sequence(self.tokens(input_ids), lengths, batch_first=True, enforce_sorted=False)
        _, (last, _) = self.lstm(packed)  # (2 directions, B, hidden): forward's last, backward's first state
        encoding = self.embedding(torch.cat([last[0], last[1]], dim=-1))
        return self.head(self.mlp(encoding))


@register_model("text_bilstm", family="text")
def text_bilstm(num_classes: int, vocab_size: int = 30522, embedding_dim: int = 300, hidden_size: int = 150,
                mlp_size: int = 200, padding_idx: int = 0) -> nn.Module:
    """Tang et al.'s distilled BiLSTM student (see the module docstring)."""
    return TextBiLSTM(num_classes, vocab_size, embedding_dim, hidden_size, mlp_size, padding_idx)
