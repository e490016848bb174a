"""Arani, Sarfraz & Zonooz, "Improving Generalization and Robustness with Noisy Collaboration in Knowledge
Distillation" (arXiv 1910.05057, 2019): the *messy collaboration* variant."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdray.algorithms.base import Batch, KnowledgeTerm, ModelOutput, register_method
from kdray.algorithms.response.kd import kl_div_with_temperature


@register_method
class MessyCollab(KnowledgeTerm):
    """Hinton KD whose hard labels are randomly corrupted:
    ``(1 - alpha) * CE(student, y') + alpha * T^2 * KL(teacher_T || student_T)``.

    ``y'`` is ``y`` with ``round(noise_rate * B)`` rows of each batch (picked uniformly without replacement)
    moved to a uniformly drawn *other* class, ``y' = (y + u) mod K`` with ``u`` uniform in ``1..K-1``. The
    paper's argument ("target variability"): the teacher's soft targets stay clean while the hard targets
    carry noise, which regularises the student and, in the paper, raises its adversarial robustness at
    about equal accuracy. The paper also corrupts the *teacher's* training labels (its "T" / "TS" modes);
    in kdray that is the teacher stage's data and is not this term's business: the term is the student side
    ("S").

    Noise comes from the term's own ``torch.Generator`` seeded with ``seed`` (CPU, then moved), so runs are
    reproducible whatever the global RNG does. Defaults are KD_Lib's ``MessyCollab`` (the only public
    implementation: ``noise_rate`` 0.02, ``T`` 20, ``alpha`` 0.5); departures from it: KD_Lib corrupts the
    *first* rows of each batch and reads the class count from the input's channel dimension
    (``data.shape[1]``, a bug for 3-channel images); kdray draws the rows at random and uses the logits' ``K``.
    With ``noise_rate = 0`` this is :class:`~kdray.algorithms.response.kd.KD`.
    """

    name = "messy_collab"
    kind = "response"
    paper = ("Arani, Sarfraz, Zonooz 2019, Improving Generalization and Robustness with Noisy Collaboration in "
             "Knowledge Distillation (arXiv)")
    provides_ce = True

    def __init__(self, alpha: float = 0.5, temperature: float = 20.0, noise_rate: float = 0.02, seed: int = 0):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"messy_collab.alpha must be in [0, 1], got {alpha}")
        if temperature <= 0:
            raise ValueError(f"messy_collab.temperature must be > 0, got {temperature}")
        if not 0.0 <= noise_rate <= 1.0:
            raise ValueError(f"messy_collab.noise_rate must be in [0, 1], got {noise_rate}")
        self.alpha = alpha
        self.temperature = temperature
        self.noise_rate = noise_rate
        self.generator = torch.Generator().manual_seed(seed)

    def corrupt(self, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
        """``targets`` with ``round(noise_rate * B)`` random rows moved to another class (a new tensor)."""
        batch = targets.shape[0]
        chosen = torch.randperm(batch, generator=self.generator)[: round(self.noise_rate * batch)]
        shift = torch.randint(1, max(num_classes, 2), (len(chosen),), generator=self.generator)
        noisy = targets.clone()
        noisy[chosen.to(targets.device)] = (targets[chosen.to(targets.device)] + shift.to(targets.device)) % num_classes
        return noisy

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        if teacher.logits.shape != student.logits.shape or student.logits.dim() != 2:
            raise ValueError(f"messy_collab: student logits {tuple(student.logits.shape)} and teacher logits "
                             f"{tuple(teacher.logits.shape)} differ in shape (same (B, K) needed)")
        noisy = self.corrupt(batch.targets, student.logits.shape[1])
        ce = F.cross_entropy(student.logits, noisy)
        kl = kl_div_with_temperature(student.logits, teacher.logits, self.temperature)
        return {"ce": (1 - self.alpha) * ce, "messy_collab": self.alpha * kl}
