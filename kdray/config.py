"""The job configuration: YAML (or a dict) validated by pydantic into one typed :class:`Config`.

Validation does every check that needs no data or model weights (names exist, ranges hold, method
parameters are known), so a bad config fails in a line before Ray starts. :func:`format_error` turns
a pydantic error into that line: the key, the bad value, what is allowed.
"""
from __future__ import annotations

import os
from importlib import resources
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator



def __getattr__(name: str):
    """``SCHEMES`` / ``SCHEME_HELP``: read from the scheme registry (kdray/orchestrator/plan.py) on use, since
    its built-in schemes are registered by modules that import this one."""
    if name in ("SCHEMES", "SCHEME_HELP"):
        from kdray.orchestrator.plan import list_schemes

        schemes = list_schemes()
        return tuple(schemes) if name == "SCHEMES" else {n: s.help for n, s in schemes.items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Datasets tokenised with a tokenizer directory (kdray/data/text.py): the teacher's, by default.
TEXT_DATASETS = ("text_files", "pang_lee_polarity", "lee_background", "rotten_tomatoes")


class ConfigError(ValueError):
    """A configuration the user must fix; the message is one line naming the key and what is allowed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(_Strict):
    """A model by registered name (``kdray list models``) with its keyword knobs."""

    model: str
    args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("model")
    @classmethod
    def _known(cls, name: str) -> str:
        from kdray.models import is_known_model, list_models

        if not is_known_model(name):
            import difflib

            close = difflib.get_close_matches(name, list_models(), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(f"unknown model {name!r}{hint}; see `kdray list models`")
        return name

    @model_validator(mode="after")
    def _knobs(self):
        from kdray.models import model_knobs

        if "num_classes" in self.args:
            raise ValueError("num_classes comes from the dataset; remove it from args")
        knobs = model_knobs(self.model)
        unknown = sorted(set(self.args) - set(knobs)) if not self.model.startswith("torchvision.") else []
        if unknown:
            raise ValueError(f"model {self.model!r} has no knob(s) {unknown}; allowed: {knobs}")
        return self


class OptimSpec(_Strict):
    epochs: int = Field(20, gt=0)
    batch_size: int = Field(64, gt=0)
    optimizer: Literal["sgd", "adamw", "dot"] = "sgd"  # dot: Zhao et al. 2023, see kdray.algorithms.optim.DOT
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    dot_delta: float = Field(0.075, ge=0, lt=1)  # DOT: momentum + dot_delta on KD, momentum - dot_delta on CE
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["constant", "step", "cosine"] = "cosine"
    milestones: list[int] = Field(default_factory=list)
    gamma: float = Field(0.1, gt=0, le=1)
    # How a step uses the hardware (kdray.algorithms.engine.TrainLoop); the defaults change nothing.
    # precision: autocast dtype of the teacher forward and the student step (fp16 adds a GradScaler);
    # knowledge terms always compute in fp32. bf16 on a CPU checks correctness, it is not faster there.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = False  # student, teacher and 4-D inputs in torch.channels_last
    compile: bool = False  # torch.compile student and teacher: seconds to a minute of start-up per stage

    @model_validator(mode="after")
    def _dot_fits(self):
        if self.optimizer == "dot":
            if not self.dot_delta <= self.momentum or self.momentum + self.dot_delta >= 1:
                raise ValueError(f"optimizer dot needs 0 <= dot_delta <= momentum and momentum + dot_delta < 1 "
                                 f"(got momentum {self.momentum}, dot_delta {self.dot_delta})")
            if self.precision == "fp16":
                raise ValueError("optimizer dot cannot run with precision: fp16 (one GradScaler step over two "
                                 "backward passes); use precision: bf16 or fp32")
        return self


class TeacherSpec(ModelSpec):
    """Where the teacher comes from: a training stage (``train``), a state_dict file, an MLflow model URI,
    or a teacher-output cache (``cache``: a directory written by ``kdray cache``; no teacher is built).
    Beside ``cache``, a ``checkpoint`` / ``mlflow_uri`` names the weights the cache must come from (hashed).
    ``classes``: the class names in the order of the given teacher's outputs, when it was trained with
    another order than the dataset's; its logits are then reordered to the dataset's order."""

    train: OptimSpec | None = None
    checkpoint: str | None = None
    mlflow_uri: str | None = None
    cache: str | None = None
    classes: list[str] | None = None
    # Recorded augmentations per sample: how many ``kdray cache`` records (default for --views), and how many of
    # the cached views a run cycles through (default: all; more than cached is an error).
    cache_views: int | None = Field(None, ge=1)
    # The model's builder loads its own pretrained weights (a text model from a local directory, e.g.
    # all_minilm_l6_v2 or hf_text with args.path): the teacher is used as built.
    pretrained: bool = False

    @model_validator(mode="after")
    def _one_source(self):
        sources = [s for s in ("train", "checkpoint", "mlflow_uri") if getattr(self, s) is not None]
        sources += ["pretrained"] if self.pretrained else []
        if self.cache is not None:
            if self.train is not None or len(sources) > 1:
                raise ValueError(f"teacher.cache replaces a teacher stage; beside it give at most one of checkpoint, "
                                 f"mlflow_uri (got {sources})")
            self.__dict__["cache"] = os.path.abspath(os.path.expanduser(self.cache))
        elif len(sources) != 1:
            raise ValueError(f"give exactly one of train, checkpoint, mlflow_uri, pretrained, cache (got "
                             f"{sources or 'none'})")
        if self.classes is not None:
            repeated = sorted({c for c in self.classes if self.classes.count(c) > 1})
            if repeated:
                raise ValueError(f"classes names {repeated} more than once; list each output class once, in order")
            if self.train is not None or self.cache is not None:
                raise ValueError("classes describes the output order of a given teacher (checkpoint / mlflow_uri); "
                                 "a teacher trained here or read from a cache uses the dataset's order: remove classes")
        if self.checkpoint is not None:
            path = os.path.abspath(os.path.expanduser(self.checkpoint))
            if not os.path.isfile(path):
                raise ValueError(f"checkpoint file {path} does not exist")
            self.__dict__["checkpoint"] = path
        return self


class MethodSpec(BaseModel):
    """One knowledge term: ``name`` plus the method's own parameters (checked against its signature)."""

    model_config = ConfigDict(extra="allow")
    name: str

    @model_validator(mode="after")
    def _params(self):
        from kdray.algorithms.base import create_method

        create_method(self.name, **self.params())  # raises with the allowed names / ranges
        return self

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class DataSpec(_Strict):
    name: str = "digits"
    root: str | None = None
    download: bool = False
    options: dict[str, Any] = Field(default_factory=dict)
    # Where training batches are made: ``device`` = the split lives on the training device as uint8 and each
    # batch is cut, cropped, flipped and normalised there in one op (digits, CIFAR, fake, a cache's recorded
    # views); ``per_sample`` = a DataLoader running the split's transforms per sample; ``auto`` = device
    # wherever the split supports it (and fits in a quarter of the device's memory), else per_sample.
    pipeline: Literal["auto", "device", "per_sample"] = "auto"
    # DataLoader worker processes on the per-sample path; None = from the worker's CPUs (ray.cpus_per_worker,
    # at most 8). With a random transform the worker count changes the draws, so it is part of the results.
    loader_workers: int | None = Field(None, ge=0)
    # Training batches of class pairs (anchors, then a same-class partner of each: CS-KD); a method that reads
    # them (``cs_kd``) turns this on by itself.
    class_pairs: bool = False

    def builder_options(self) -> dict:
        """The dataset builder's options as every split is built with them (CIFAR's ``download`` comes from
        ``download``); a teacher cache records them to tell whether it was made from the same data."""
        opts = dict(self.options)
        if self.name in ("cifar10", "cifar100"):
            opts.setdefault("download", self.download)
        return opts

    @field_validator("root")
    @classmethod
    def _absolute(cls, root: str | None) -> str | None:
        # Ray workers and Tune trials run in other directories: resolve against the driver's.
        return None if root is None else os.path.abspath(os.path.expanduser(root))

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        from kdray.data import list_datasets

        if name not in list_datasets():
            raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(list_datasets())}")
        return name


class EnsembleSpec(_Strict):
    """How a multi-teacher ensemble is combined, and whether its teachers are sharded across workers."""

    combine: Literal["mean", "weights", "confidence", "random"] = "mean"
    weights: list[float] | None = None
    shard: bool = True  # with ray.num_workers > 1: each worker hosts a subset of the teachers


class OnlineSpec(_Strict):
    """Online distillation: K peers learn together (DML), or from their ensemble (ONE/KDCL style)."""

    peers: list[ModelSpec] = Field(default_factory=list)
    mode: Literal["dml", "ensemble"] = "dml"
    weight: float = Field(1.0, ge=0)
    temperature: float = Field(1.0, gt=0)


class SelfSpec(_Strict):
    """Self-distillation: born-again generations (each teaches the next) or BYOT auxiliary exits."""

    method: Literal["born_again", "byot"] = "born_again"
    generations: int = Field(3, ge=2)


class AdversarialSpec(_Strict):
    """Adversarial distillation (kdray/algorithms/schemes/adversarial.py): a discriminator tells the teacher's
    outputs (``on: logits``) or pooled features at a point (``on: feature``, ``feature: <module path>``) from the
    student's; the student adds ``weight`` x the fool loss to its ``methods:`` (``mode: beside``) or trains on
    CE + the fool loss alone (``mode: instead``, no methods). The discriminator is an MLP of width ``hidden``
    with its own Adam (``lr``, ``betas``), updated ``d_steps`` times per student step.
    ``preset: meal_v2`` (Shen & Savvides 2020): the teachers' mean (``ensemble.combine: mean``), no hard labels
    (``ce_weight: 0``), ``methods: [{name: kd, alpha: 1, temperature: 1}]`` (KL at temperature 1), logit
    discriminator, ``mode: beside``. ``conditional``: the discriminator also reads the sample's one-hot label
    (Xu et al. 2018's conditional adversarial networks)."""

    on: Literal["logits", "feature"] = "logits"
    feature: str | None = None
    mode: Literal["beside", "instead"] = "beside"
    weight: float = Field(1.0, gt=0)
    lr: float = Field(2e-4, gt=0)
    betas: tuple[float, float] = (0.5, 0.999)
    d_steps: int = Field(1, ge=1)
    hidden: int = Field(64, ge=1)
    conditional: bool = False
    preset: Literal["none", "meal_v2"] = "none"

    @model_validator(mode="before")
    @classmethod
    def _yaml_on_key(cls, data):
        """YAML 1.1 reads an unquoted ``on:`` key as the boolean ``True`` (PyYAML does): take it as ``on``."""
        if isinstance(data, dict) and True in data and "on" not in data:
            data = {("on" if k is True else k): v for k, v in data.items()}
        return data

    @model_validator(mode="after")
    def _feature_point(self):
        if self.on == "feature" and not self.feature:
            raise ValueError("adversarial.on: feature needs adversarial.feature: <module path> (e.g. layer3)")
        if self.on == "logits" and self.feature:
            raise ValueError(f"adversarial.feature ({self.feature!r}) is read only with adversarial.on: feature")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"adversarial.betas must be two numbers in [0, 1), got {list(self.betas)}")
        return self


class DeepInversionSpec(_Strict):
    """DeepInversion (scheme ``deep_inversion``): images synthesised from the teacher's BatchNorm statistics,
    then the students trained on them (see :mod:`kdray.algorithms.datafree.inversion` for the objective and the
    paper's defaults)."""

    images_per_class: int = Field(30, ge=1)
    steps: int = Field(150, ge=1)
    lr: float = Field(0.1, gt=0)
    bn_weight: float = Field(1.0, ge=0)
    tv_weight: float = Field(1e-3, ge=0)
    l2_weight: float = Field(1e-5, ge=0)
    noise_baseline: bool = True  # also a student distilled on as many N(0, 1) noise images
    # Adaptive DeepInversion (paper: competition 10 on CIFAR; 0: off): after a plain round of
    # (1 - adaptive_fraction) x images_per_class, a competitor student is distilled on them and the remaining
    # images are synthesised where it disagrees with the teacher (1 - JS at competition_temperature).
    competition_weight: float = Field(0.0, ge=0)
    competition_temperature: float = Field(3.0, gt=0)
    adaptive_fraction: float = Field(0.5, gt=0, lt=1)

    @model_validator(mode="after")
    def _two_rounds_have_images(self):
        adaptive = self.adaptive_images_per_class()
        if self.competition_weight and not 0 < adaptive < self.images_per_class:
            raise ValueError(f"deep_inversion.adaptive_fraction {self.adaptive_fraction} of images_per_class "
                             f"{self.images_per_class} leaves a round without images; raise images_per_class")
        return self

    def adaptive_images_per_class(self) -> int:
        """Images per class of the adaptive (competition) round; 0 without Adaptive DeepInversion."""
        return round(self.images_per_class * self.adaptive_fraction) if self.competition_weight else 0


class DataFreeSpec(_Strict):
    """Data-free distillation (scheme ``data_free``): a generator replaces the training images.

    ``method``: ``dafl`` (Chen et al. 2019), ``dfad`` (Fang et al. 2019) or ``zskt`` (Micaelli & Storkey 2019);
    see :mod:`kdray.algorithms.datafree.loop`. An epoch is ``steps_per_epoch`` iterations of ``batch_size``
    generated images (``train.epochs`` of them). ``student_steps`` / ``generator_steps``: the updates of each per
    iteration of ``dfad`` / ``zskt`` (papers: DFAD 5 / 1, ZSKT 10 / 1; ``dafl`` does one of each).
    ``alpha`` / ``beta``: DAFL's activation and information-entropy weights (paper 0.1 / 5).
    ``noise_baseline``: also distil a student on pure Gaussian noise (the floor a generator must beat)."""

    method: Literal["dafl", "dfad", "zskt"] = "dafl"
    latent_dim: int = Field(100, gt=0)
    channels: int | None = Field(None, gt=0)  # the generator's image channels / side; None: the teacher's inputs'
    image_size: int | None = Field(None, gt=0)
    generator_width: int = Field(128, ge=2)
    generator_lr: float = Field(1e-3, gt=0)
    steps_per_epoch: int = Field(50, gt=0)
    batch_size: int = Field(256, ge=2)
    student_steps: int = Field(5, gt=0)
    generator_steps: int = Field(1, gt=0)
    alpha: float = Field(0.1, ge=0)
    beta: float = Field(5.0, ge=0)
    noise_baseline: bool = True
    # The scale of the teacher's inputs: generated (and noise) images are input_mean + input_std * N(0,1)-like
    # images. Defaults: normalised inputs (DAFL's setting); digits' raw pixels are about mean 0.3, std 0.375.
    input_mean: float = 0.0
    input_std: float = Field(1.0, gt=0)
    # ZSKT's attention term on the student's loss (the paper's beta, 250; 0: the KL alone) over block pairs:
    # attention_points: {student: [...], teacher: [...]} module paths (default: each model's declared stages).
    attention_weight: float = Field(0.0, ge=0)
    attention_points: dict[Literal["student", "teacher"], list[str]] | None = None

    @model_validator(mode="after")
    def _attention_is_zskts(self):
        if self.attention_weight and self.method != "zskt":
            raise ValueError(f"data_free.attention_weight is ZSKT's attention term: use method: zskt (got "
                             f"{self.method!r}) or remove attention_weight")
        if self.attention_points is not None and set(self.attention_points) != {"student", "teacher"}:
            raise ValueError("data_free.attention_points needs both student: [...] and teacher: [...] (as many each)")
        return self


class QuantizedSpec(_Strict):
    """Quantised distillation (scheme ``quantized``, :mod:`kdray.algorithms.quantize`): the student trains with
    fake-quantised weights (``bits``, ``granularity`` per output channel or per tensor) and layer inputs
    (``act_bits``, default ``bits``); the first and last layer stay fp32 unless ``quantize_first_last``
    (Apprentice's default). ``self_study_epochs``: QKD's self-studying phase, that many first epochs of CE
    alone before the methods teach (0: KD from the start, as Polino et al. and Apprentice).
    ``teacher_bits``: the frozen teacher quantised too (post-training, same granularity), None: fp32.
    ``latency_runs``: timed batch-of-64 CPU forwards whose median is the export's ``latency_ms``.
    ``export_dir``: where the low-bit exports go (default ``<output_dir>/<name>/exports``), made absolute when the
    config is validated on the driver, so Ray Train workers (which run elsewhere) write there too."""

    bits: int = 4
    granularity: Literal["per_channel", "per_tensor"] = "per_channel"
    act_bits: int | None = None
    quantize_first_last: bool = False
    self_study_epochs: int = Field(0, ge=0)
    teacher_bits: int | None = None
    latency_runs: int = Field(15, ge=1)
    export_dir: str | None = None
    alone_baseline: bool = True  # the same quantised student without KD (CE only), per seed

    @field_validator("bits", "act_bits", "teacher_bits", mode="before")
    @classmethod
    def _supported(cls, bits: Any, info) -> Any:
        from kdray.algorithms.quantize import SUPPORTED_BITS

        if bits is None and info.field_name != "bits":
            return None
        if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
            raise ValueError(f"must be one of {', '.join(map(str, SUPPORTED_BITS))} bits (the widths kdray "
                             f"quantises, packs and tests)")
        return bits


class GraphSpec(_Strict):
    """Graph distillation (scheme ``graph``, :mod:`kdray.algorithms.schemes.graph`): ``method`` ``glnn`` (GNN ->
    MLP; ``lam`` weights the CE on labelled nodes, ``1 - lam`` the KL at ``temperature`` on every node the student
    may see) or ``lsp`` (GNN -> GNN; CE + ``lsp_weight`` x the local-structure KL under ``lsp_kernel``). ``setting``: ``transductive``
    (every node and edge seen in training, test labels hidden) or ``inductive`` (the test nodes' edges hidden)."""

    method: Literal["glnn", "lsp"] = "glnn"
    lam: float = Field(0.5, ge=0, le=1)
    temperature: float = Field(1.0, gt=0)
    lsp_weight: float = Field(10.0, ge=0)
    lsp_kernel: Literal["rbf", "l2"] = "rbf"
    setting: Literal["transductive", "inductive"] = "transductive"


class LifelongSpec(_Strict):
    """Lifelong / class-incremental learning (scheme ``lifelong``; kdray/algorithms/lifelong.py): ``tasks`` is
    the sequence of class splits (labels), learnt one after another; the frozen model of task t-1 teaches on
    task t's data. ``methods``: the methods compared, one stage each per seed (``finetune``: no distillation,
    the baseline; ``lwf``: Learning without Forgetting, ``lambda_old`` x KD at ``temperature`` on the old
    classes, paper 1 / 2; ``icarl``: ``exemplars_per_class`` replayed exemplars per old class chosen by
    ``selection`` (``herding`` on the feature means, or ``random``) and iCaRL's sigmoid distillation).
    ``epochs_per_task``: the epochs of each task (None: ``train.epochs``; the optimizer and schedule restart at
    each task)."""

    tasks: list[list[int]] = Field(default_factory=lambda: [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], min_length=1)
    methods: list[Literal["finetune", "lwf", "icarl"]] = Field(
        default_factory=lambda: ["finetune", "lwf", "icarl"], min_length=1)
    epochs_per_task: int | None = Field(None, gt=0)
    temperature: float = Field(2.0, gt=0)
    lambda_old: float = Field(1.0, ge=0)
    exemplars_per_class: int = Field(20, gt=0)
    selection: Literal["herding", "random"] = "herding"

    @field_validator("tasks")
    @classmethod
    def _disjoint(cls, tasks: list[list[int]]) -> list[list[int]]:
        seen: dict[int, int] = {}
        for t, classes in enumerate(tasks):
            if not classes:
                raise ValueError(f"task {t} names no class; give each task at least one class label")
            for c in classes:
                if c < 0:
                    raise ValueError(f"task {t} names class {c}; class labels are 0 .. num_classes-1")
                if c in seen:
                    where = f"tasks {seen[c]} and {t}" if seen[c] != t else f"task {t} twice"
                    raise ValueError(f"class {c} is in {where}; class-incremental tasks must not overlap")
                seen[c] = t
        return tasks

    @field_validator("methods")
    @classmethod
    def _distinct_methods(cls, methods: list[str]) -> list[str]:
        if len(set(methods)) != len(methods):
            raise ValueError(f"methods must be distinct, got {methods}")
        return methods


class RCOSpec(_Strict):
    """Route-constrained optimisation (scheme ``rco``, Jin et al. ICCV 2019): the teacher's weights after each
    of the ``anchors`` epochs (1-based: ``3`` = after its third epoch, before the last) teach the student in
    turn, ``epochs_per_anchor`` epochs each (None: ``train.epochs``), then the final teacher for
    ``train.epochs``. The student carries its weights from one anchor to the next; the optimizer and the
    schedule restart per anchor. See :mod:`kdray.orchestrator.schemes.rco`."""

    anchors: list[int] = Field(default_factory=list)
    epochs_per_anchor: int | None = Field(None, gt=0)

    @field_validator("anchors")
    @classmethod
    def _increasing(cls, anchors: list[int]) -> list[int]:
        if any(a < 1 for a in anchors) or any(b <= a for a, b in zip(anchors, anchors[1:])):
            raise ValueError(f"anchors must be increasing teacher epochs >= 1, got {anchors}")
        return anchors


class LMSpec(_Strict):
    """Language-model distillation (scheme ``lm``; :mod:`kdray.algorithms.lm`): per token, the student's
    next-token distribution is pulled to the teachers' by ``loss`` (``ce``: the corpus tokens alone; a
    divergence: ``forward_kl``, ``reverse_kl``, ``jsd`` with GKD's ``beta`` (TRL's ends: 0 forward KL, 1
    reverse KL), ``total_variation``, ``skew_kl`` / ``skew_reverse_kl`` with DistiLLM's ``skew_alpha``) at
    ``temperature``, over the full vocabulary or the teacher's ``top_k`` plus a rest bucket, chunked over
    ``chunk_tokens`` positions. ``on_policy_lambda`` (GKD's lambda): the fraction of batches whose completions the
    student samples (``generation_temperature``) and the teacher scores; ``seq_kd``: completions the teacher
    generates instead. Both need a prompt: the first ``prompt_tokens`` of every window (also left out of every
    batch's loss). Several teachers are combined per token by ``combine`` (``mean``, ``weights``,
    ``confidence``); ``shard_teachers``: on Ray Train workers, teacher m lives on worker m % N only, scores every
    worker's rows and sends each its log-probs (kdray/orchestrator/lm_placement.py), in ``teacher_dtype``.
    ``topk_cache``: the Parquet file ``kdray cache`` wrote of the teacher's top-k on the training windows; the
    students then train from it without the teacher in memory (held-out figures without the teacher's).
    Every ``log_every_steps`` steps the token losses go to MLflow; per epoch ``generations``
    samples of ``generation_tokens`` tokens go to ``generations/epoch_NNNN.txt``."""

    loss: Literal["ce", "forward_kl", "reverse_kl", "jsd", "total_variation", "skew_kl",
                  "skew_reverse_kl"] = "forward_kl"
    temperature: float = Field(1.0, gt=0)
    beta: float = Field(0.5, ge=0, le=1)
    skew_alpha: float = Field(0.1, ge=0, le=1)
    top_k: int | None = Field(None, ge=1)
    chunk_tokens: int | None = Field(None, ge=1)
    on_policy_lambda: float = Field(0.0, ge=0, le=1)
    seq_kd: bool = False
    generation_temperature: float = Field(1.0, gt=0)
    prompt_tokens: int = Field(0, ge=0)
    combine: Literal["mean", "weights", "confidence"] = "mean"
    weights: list[float] | None = None
    shard_teachers: bool = False
    topk_cache: str | None = None
    teacher_dtype: Literal["float32", "bfloat16"] = "float32"
    grad_clip: float | None = Field(1.0, gt=0)
    log_every_steps: int = Field(20, ge=1)
    generations: int = Field(3, ge=0)
    generation_tokens: int = Field(48, ge=1)


class CrossModalSpec(_Strict):
    """Cross-modal distillation (scheme ``cross_modal``, Gupta, Hoffman & Malik 2016): a dataset whose inputs
    are a mapping of modalities (``data: {name: digits_two_views}``); the teacher reads ``teacher_input``, the
    student ``student_input`` of the same paired samples. Per seed a ``labelled_fraction`` of the training
    samples keeps its label for the student (``labelled_sampling``: ``stratified`` per class, or ``random``):
    the baseline student trains on those alone, the taught one on all paired samples (knowledge terms on all,
    CE on the labelled). See :mod:`kdray.algorithms.schemes.cross_modal`."""

    teacher_input: str = "image"
    student_input: str = "profile"
    labelled_fraction: float = Field(0.1, gt=0, le=1)
    labelled_sampling: Literal["stratified", "random"] = "stratified"


class CheckpointSpec(_Strict):
    """How often a stage is checkpointed (and its buffered epoch metrics flushed to MLflow).

    Each checkpoint is a Ray Train report, a barrier across workers that costs ~1.5 s on a small
    CPU machine, so tiny epochs should not report every epoch. A stage always checkpoints at its end.
    """

    every_epochs: int = Field(10, gt=0)
    keep: int = Field(2, gt=0)


class RaySpec(_Strict):
    """Placement on Ray Train. ``num_workers: 0`` runs the job in this process, without Ray."""

    num_workers: int = Field(1, ge=0)
    use_gpu: bool | Literal["auto"] = "auto"
    cpus_per_worker: float = Field(1, gt=0)
    address: str | None = None
    max_failures: int = Field(0, ge=-1)
    # Seconds Ray Train waits for its worker group's resources before failing (after max_failures retries):
    # a cluster that may autoscale gets this long to add nodes; a fixed-size one that can never fit the
    # workers is refused before training.
    start_timeout_s: float = Field(600, gt=0)
    sync_batchnorm: bool = False  # BatchNorm statistics across data-parallel replicas (SyncBN)
    # Run the job's stages as dependent Ray tasks (kdray/orchestrator/stage_graph.py) instead of one after
    # another in one Train run: each stage is one single-process task that starts when the stages teaching it
    # have finished, so independent stages (other seeds' chains, baselines) run concurrently.
    stage_tasks: bool = False

    @model_validator(mode="after")
    def _stage_tasks_one_worker(self):
        if self.stage_tasks and self.num_workers != 1:
            raise ValueError(f"ray.stage_tasks runs each stage as one single-process Ray task; set "
                             f"ray.num_workers: 1 (got {self.num_workers})")
        return self


class MLflowSpec(_Strict):
    tracking_uri: str | None = None
    experiment: str = "kdray"
    enabled: bool = True
    # CPU, memory, disk, network (GPU with the `gpu` extra) sampled into each stage run as system/* metrics,
    # every MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (10 by default)
    system_metrics: bool = True


def check_job_name(name: Any) -> str:
    """A job's (or sweep's) files go to ``<output_dir>/<name>/``: the name must be one directory name.
    ``..`` would put them in ``output_dir``'s parent, ``.`` in ``output_dir`` itself, ``a/b`` deeper."""
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
    if not isinstance(name, str) or name in ("", ".", "..") or not set(name) <= allowed:
        raise ValueError("must be one directory name of letters, digits, '_', '-' and '.', not '.' or '..'")
    return name


class Config(_Strict):
    name: str = "kdray-job"
    output_dir: str = "kdray-runs"
    scheme: str = "offline"  # a registered scheme (kdray/orchestrator/schemes, `kdray list schemes`)
    data: DataSpec = Field(default_factory=DataSpec)
    teacher: TeacherSpec | None = None
    teachers: list[TeacherSpec] = Field(default_factory=list)
    ensemble: EnsembleSpec = Field(default_factory=EnsembleSpec)
    assistants: list[ModelSpec] = Field(default_factory=list)
    online: OnlineSpec = Field(default_factory=OnlineSpec)
    self_distill: SelfSpec = Field(default_factory=SelfSpec)
    adversarial: AdversarialSpec = Field(default_factory=AdversarialSpec)
    deep_inversion: DeepInversionSpec = Field(default_factory=DeepInversionSpec)
    data_free: DataFreeSpec = Field(default_factory=DataFreeSpec)
    graph: GraphSpec = Field(default_factory=GraphSpec)
    quantized: QuantizedSpec = Field(default_factory=QuantizedSpec)
    lifelong: LifelongSpec = Field(default_factory=LifelongSpec)
    cross_modal: CrossModalSpec = Field(default_factory=CrossModalSpec)
    rco: RCOSpec = Field(default_factory=RCOSpec)
    lm: LMSpec = Field(default_factory=LMSpec)
    student: ModelSpec
    methods: list[MethodSpec] = Field(default_factory=lambda: [MethodSpec(name="kd")])
    ce_weight: float = Field(1.0, ge=0)
    train: OptimSpec = Field(default_factory=OptimSpec)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    baseline: bool = True
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    ray: RaySpec = Field(default_factory=RaySpec)
    mlflow: MLflowSpec = Field(default_factory=MLflowSpec)

    @field_validator("name", mode="before")
    @classmethod
    def _one_directory(cls, name: Any) -> str:
        return check_job_name(name)

    @field_validator("scheme", mode="before")
    @classmethod
    def _registered(cls, name: Any) -> str:
        from kdray.orchestrator.plan import get_scheme

        get_scheme(name)  # unknown: the allowed names, in pydantic's Literal words
        return name

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct, got {seeds}")
        return seeds

    @model_validator(mode="after")
    def _scheme_needs(self):
        """Each scheme names what it needs (its ``check``); a config giving the wrong parts fails here, in one
        line. A section only another scheme reads, given with a value of its own, fails too: it would be ignored."""
        from kdray.orchestrator.plan import get_scheme, section_owners

        scheme = get_scheme(self.scheme)
        scheme.check(self)
        if self.train.optimizer == "dot" and self.ray.num_workers > 1:
            raise ValueError(f"train.optimizer: dot cannot run data-parallel (DDP syncs one backward per forward, "
                             f"DOT needs two); set ray.num_workers: 1 or 0 (got {self.ray.num_workers})")
        for section, owners in section_owners().items():
            if section in scheme.sections or section not in self.model_fields_set:
                continue
            default = type(self).model_fields[section].get_default(call_default_factory=True)
            value = getattr(self, section)
            if (value.model_dump() if isinstance(value, BaseModel) else value) == (
                    default.model_dump() if isinstance(default, BaseModel) else default):
                continue  # a dumped config (model_dump) gives every section, at its default
            belongs = " or ".join(repr(o) for o in owners)
            raise ValueError(f"{section}: is a section of scheme {belongs}, not of scheme {self.scheme!r}; remove "
                             f"it or set scheme: {owners[0]} (see `kdray list schemes`)")
        return self

    @model_validator(mode="after")
    def _text_tokenizer_from_teacher(self):
        """A text dataset is tokenised with the teacher's tokenizer; without ``data.options.tokenizer`` it is
        the first teacher's own directory (``hf_text`` with ``args.path``, or ``all_minilm_l6_v2``)."""
        if self.data.name not in TEXT_DATASETS or "tokenizer" in self.data.options:
            return self
        for spec in self.teacher_specs():
            directory = "all_minilm_l6_v2" if spec.model == "all_minilm_l6_v2" else (
                spec.args.get("path") if spec.model == "hf_text" else None)
            if directory:
                self.data.options["tokenizer"] = str(directory)
                break
        return self

    def teacher_specs(self) -> list[TeacherSpec]:
        """The pre-trained teachers: ``teachers:`` for a scheme that reads that section (and gets them, when it
        reads ``teacher:`` too), else ``teacher:``."""
        return [spec for _, spec in self.teacher_paths()]

    def teacher_paths(self) -> list[tuple[str, TeacherSpec]]:
        """Each teacher with its config path (``teacher``, ``teachers.1``, ...)."""
        from kdray.orchestrator.plan import get_scheme

        sections = get_scheme(self.scheme).sections
        if "teachers" in sections and (self.teachers or "teacher" not in sections):
            return [(f"teachers.{i}", spec) for i, spec in enumerate(self.teachers)]
        return [("teacher", self.teacher)] if self.teacher else []

    def run_dir(self) -> str:
        return os.path.join(os.path.abspath(os.path.expanduser(self.output_dir)), self.name)


def format_error(err: ValidationError) -> str:
    """One line: ``key.path: message (got VALUE)`` for the first problem, and how many more there are."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "config"
    msg = first["msg"].removeprefix("Value error, ")
    got = first.get("input")
    shown = "" if isinstance(got, dict) or first["type"] == "missing" else f" (got {got!r})"
    more = f" [+{len(err.errors()) - 1} more]" if len(err.errors()) > 1 else ""
    return f"{loc}: {msg}{shown}{more}"


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's own words for a syntax error, in one line: what it expected, and while parsing what."""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context = getattr(err, "context", None)
    return f"{problem} {context}" if context else problem


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(part.strip() for part in path):
        raise ConfigError(f"override {text!r} has no key{' part' if key.strip() else ''} before '='; write "
                          f"key.path=value, e.g. train.epochs=3")
    try:
        return [part.strip() for part in path], yaml.safe_load(raw)
    except yaml.YAMLError as err:  # e.g. seeds=[0,1 : the shell passed an unclosed bracket
        raise ConfigError(f"override {text!r}: the value {raw!r} is not valid YAML ({_yaml_problem(err)}); close "
                          f"its brackets or quote it, e.g. seeds=[0,1]") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """CLI ``a.b=value`` overrides; values are YAML (``seeds=[0,1]``, ``ray.num_workers=2``)."""
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return raw


def packaged_examples() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("kdray.examples").iterdir()
                  if p.name.endswith(".yaml"))


def read_yaml(source: str) -> dict:
    """A YAML file path, or the name of an example shipped in the package (``digits``)."""
    if os.path.isdir(source):
        found = sorted(n for n in os.listdir(source) if n.endswith((".yaml", ".yml")))
        hint = f" such as {os.path.join(source, found[0])}" if found else ""
        raise ConfigError(f"config {source!r} is a directory; give a YAML file{hint} or a packaged example "
                          f"({', '.join(packaged_examples())})")
    if os.path.isfile(source):
        with open(source) as fh:
            text = fh.read()
    elif source in packaged_examples():
        text = resources.files("kdray.examples").joinpath(f"{source}.yaml").read_text()
    else:
        raise ConfigError(
            f"config {source!r} is neither a file nor a packaged example ({', '.join(packaged_examples())})"
        )
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:  # file:line:col of the problem, as editors and compilers print it
        mark = getattr(err, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
        raise ConfigError(f"{where}: not valid YAML: {_yaml_problem(err)}; fix the syntax there") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of config keys")
    return raw


def load_config(source: str | dict | Config, overrides: list[str] | None = None) -> Config:
    """Validate a YAML path / example name / dict into a :class:`Config`; raise :class:`ConfigError`."""
    if isinstance(source, Config):
        if not overrides:
            return source
        source = source.model_dump()
    raw = read_yaml(source) if isinstance(source, str) else dict(source)
    if "space" in raw and "base" in raw and "student" not in raw:
        name = source if isinstance(source, str) else "this config"
        raise ConfigError(f"{name} is a sweep file (base: + space:), not a job: run it with `kdray sweep {name}` "
                          f"or kdray.sweep(...)")
    raw = apply_overrides(raw, overrides or [])
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_error(err)) from None
