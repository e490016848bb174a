"""lm: language-model distillation on a token corpus (``data: {name: lm_text}``); the ``lm:`` section.

Stages: each teacher that needs training (``teacher.train``) is trained on the corpus tokens with
cross-entropy; then per seed the student on the same tokens with cross-entropy alone (``ce-seed<N>``, the
baseline, when ``baseline: true``) and the student taught by ``lm.loss`` (``<loss>-seed<N>``). Every stage is
:class:`~kdray.algorithms.lm.loop.LMTrainLoop` (the step is :func:`~kdray.algorithms.lm.step.lm_step_losses`)
handed to :func:`~kdray.orchestrator.job.complete_stage`, so checkpoints, resume, Ray Train workers (the
student under DDP, each worker with every teacher), progress and MLflow are those of every other stage.

What a stage reports: ``val_top1`` / ``test_top1`` are next-token accuracy (what ``kdray sweep`` maximises),
``*_perplexity`` the perplexity on the true tokens and ``*_perplexity_under_teacher`` = exp(mean_t
H(p_teacher, p_student)) under the teaching distribution (the teacher's; several teachers combined by
``lm.combine``, as the student is taught); the baseline is scored against it too, so the rows compare. In
MLflow each stage's run has the token losses every ``lm.log_every_steps`` steps
(``step_lm_<loss>``), the held-out figures per epoch, ``lm.generations`` sampled continuations of held-out
prompts per epoch (``generations/epoch_NNNN.txt``) and the job's run ``lm_perplexity.png``.
"""
from __future__ import annotations

import math
import os
import statistics
import time

import torch

from kdray.algorithms.engine import seed_everything
from kdray.algorithms.lm.generation import causal_logits, sample_completions
from kdray.algorithms.lm.loop import LMTrainLoop
from kdray.algorithms.lm.multi_teacher import combine_teacher_logits
from kdray.algorithms.lm.on_policy import OnPolicySource
from kdray.algorithms.lm.step import LMLossSettings, held_out_figures
from kdray.algorithms.lm.topk import TeacherTopK
from kdray.algorithms.lm.vocabulary import check_shared_vocabulary, lm_vocab_size
from kdray.config import ConfigError
from kdray.models import create_model
from kdray.orchestrator.build import build_optimizer, build_teacher_model
from kdray.orchestrator.job import StageParts, complete_stage, stage_logging
from kdray.orchestrator.lm_cache import lm_models
from kdray.orchestrator.lm_placement import ShardedLMTeachers
from kdray.orchestrator.plan import Scheme, TeacherSource, from_stage, model_spec, register_scheme, stage

KINDS = {"teacher": "lm_teacher", "scratch": "lm_scratch", "taught": "lm_distill"}


def completion_mask(ids: torch.Tensor, prompt_tokens: int) -> torch.Tensor:
    """Every position a target except the first ``prompt_tokens`` of each window (the prompt)."""
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, :prompt_tokens] = False
    return mask


class CombinedTeachers(torch.nn.Module):
    """Several teachers as the one distribution the student is taught: per token, their log-probs combined by
    ``rule`` (what :class:`~kdray.orchestrator.lm_placement.ShardedLMTeachers` gives across workers)."""

    def __init__(self, teachers: list, rule: str, weights: list[float] | None):
        super().__init__()
        self.teachers, self.rule, self.weights = torch.nn.ModuleList(teachers), rule, weights

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logprobs = [causal_logits(t, input_ids).float().log_softmax(-1) for t in self.teachers]
        return combine_teacher_logits(logprobs, self.rule, self.weights)[0]


class LMStageLoop:
    """An :class:`LMTrainLoop` as :func:`complete_stage` drives a stage's loop: epoch callbacks (checkpoints,
    progress, MLflow), the schedule stepped per epoch, ``train_loss`` and ``epoch_time_s`` in each row, a test
    report and a state that includes the schedule."""

    def __init__(self, loop: LMTrainLoop, scheduler, callbacks: list, test: tuple, eval_model, teacher,
                 on_epoch_text=None):
        self.loop, self.scheduler, self.callbacks, self.test = loop, scheduler, callbacks, test
        self.eval_model, self.teacher, self.on_epoch_text = eval_model, teacher, on_epoch_text
        self.epochs = loop.epochs
        self._started = time.perf_counter()
        loop.on_epoch = self._epoch_done

    @property
    def epoch(self) -> int:
        return self.loop.epoch

    def _epoch_done(self, row: dict) -> None:
        row["train_loss"] = sum(v for k, v in row.items() if k.startswith("train_lm_"))
        row["epoch_time_s"] = time.perf_counter() - self._started
        if self.scheduler is not None:
            self.scheduler.step()
        if self.on_epoch_text is not None:
            self.on_epoch_text(self.loop.epoch)
        metrics = {k: v for k, v in row.items() if k != "epoch"}
        for callback in self.callbacks:
            callback.on_epoch_end(self.loop.epoch - 1, metrics, self)
        self._started = time.perf_counter()

    def run(self) -> list[dict]:
        self._started = time.perf_counter()
        return self.loop.run()

    def evaluate_test(self, _loader=None) -> dict[str, float]:
        ids, mask = self.test
        return held_out_figures(self.eval_model, ids, mask, self.teacher)

    def state_dict(self) -> dict:
        state = self.loop.state_dict()
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.loop.load_state_dict(state)
        if self.scheduler is not None and "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])


def epoch_batches(windows: torch.Tensor, batch_size: int, seed: int, rank: int, world: int, prompt_tokens: int,
                  cache=None):
    """``batches(epoch)`` for :class:`LMTrainLoop`: the windows shuffled by ``(seed, epoch)``, cut into global
    batches of ``batch_size``, each rank taking its ``batch_size // world`` rows (the same batches resumed);
    with a top-k ``cache`` of the windows, each batch also carries its rows' teacher top-k."""
    per_rank = max(1, batch_size // world)

    def batches(epoch: int):
        order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        for start in range(0, len(order) - per_rank * world + 1, per_rank * world):
            rows = order[start + rank * per_rank: start + (rank + 1) * per_rank]
            ids = windows[rows]
            if cache is None:
                yield ids, completion_mask(ids, prompt_tokens)
                continue
            indices, logprobs = cache.rows(rows)  # positions [:, :-1] predict the next tokens
            yield ids, completion_mask(ids, prompt_tokens), TeacherTopK(
                indices[:, :-1].to(ids.device), logprobs[:, :-1].to(ids.device), cache.temperature, cache.vocab_size)

    return batches


def read_topk_cache(cfg, splits, tracking_uri):
    """The job's ``lm.topk_cache``, refused in one line when another teacher, tokenizer, corpus, k or
    temperature made it (its fingerprint; the teacher's weights are read for it, not built)."""
    from kdray.data.lm_topk_cache import lm_cache_fingerprint, read_lm_topk_metadata, read_lm_topk_parquet
    from kdray.orchestrator.cache_store import teacher_state
    from kdray.orchestrator.teacher_cache import lm_tokenizer_id

    path = cfg.lm.topk_cache
    if not os.path.isfile(path):
        raise ConfigError(f"lm.topk_cache {path!r} is not a file; write it with `kdray cache <this config> --topk K`")
    state, _, _ = teacher_state(cfg.teacher, tracking_uri)
    k = read_lm_topk_metadata(path)["k"] if cfg.lm.top_k is None else cfg.lm.top_k
    expected = lm_cache_fingerprint(state, lm_tokenizer_id(cfg), splits.train.windows, k, cfg.lm.temperature)
    try:
        return read_lm_topk_parquet(path, expected_fingerprint=expected)
    except ValueError as err:
        raise ConfigError(f"lm.topk_cache: {str(err).splitlines()[0]}") from None


def generations_text(model, prompts: torch.Tensor, prompt_tokens: int, new_tokens: int, decode, seed: int,
                     temperature: float) -> str:
    """Sampled continuations of held-out prompts, one block per prompt: ``prompt | continuation``."""
    device = prompts.device
    ids = torch.cat([prompts[:, :prompt_tokens],
                     torch.zeros(len(prompts), new_tokens, dtype=torch.long, device=device)], 1)
    out = sample_completions(model, ids, completion_mask(ids, prompt_tokens), temperature,
                             torch.Generator(device).manual_seed(seed))
    blocks = [f"{decode(row[:prompt_tokens])!r} | {decode(row[prompt_tokens:])!r}" for row in out.cpu()]
    return "\n\n".join(blocks) + "\n"


def perplexity_figure(cfg, rows: list[dict]):
    """``lm_perplexity.png``: test perplexity and perplexity under the teacher per stage group (seed means)."""
    from kdray.orchestrator.plots import bucket_bars

    groups = {}
    for row in rows:
        label = row["name"].rsplit("-seed", 1)[0]
        groups.setdefault(label, []).append(row)
    labels = list(groups)
    series = {}
    for key, title in (("test_perplexity", "perplexity"), ("test_perplexity_under_teacher", "under the teacher")):
        values = [statistics.mean(r[key] for r in groups[g]) if all(key in r for r in groups[g]) else float("nan")
                  for g in labels]
        if not all(math.isnan(v) for v in values):
            series[title] = values
    return bucket_bars({"held-out test tokens": (labels, series)}, "perplexity (lower is better)",
                       f"{cfg.name}: perplexity by stage") if series else None


@register_scheme
class LanguageModel(Scheme):
    name = "lm"
    help = ("language-model distillation on a token corpus (data: lm_text): token-level CE / KL / reverse KL / "
            "JSD / TV / skew KL, top-k, on-policy (GKD lambda), seq-KD, several teachers (lm: ...)")
    sections = ("teacher", "teachers", "lm")
    own_stage_kinds = tuple(KINDS.values())
    searched_kind = KINDS["taught"]

    def check(self, cfg):
        specs = cfg.teacher_specs()
        if not specs:
            raise ValueError("scheme 'lm' needs a teacher: give teacher: {model: causal_lm, train: {...}} (or "
                             "checkpoint / mlflow_uri), or teachers: [...]")
        if cfg.teacher is not None and cfg.teachers:
            raise ValueError("scheme 'lm' takes teacher: or teachers: [...], not both")
        for path, spec in cfg.teacher_paths():
            if spec.cache is not None:
                raise ValueError(f"{path}.cache: an LM teacher's top-k cache is read through the LM cache "
                                 f"(kdray.data.lm_topk_cache); give {path}.train, checkpoint or mlflow_uri")
        lm = cfg.lm
        if (lm.on_policy_lambda > 0 or lm.seq_kd) and lm.prompt_tokens < 1:
            raise ValueError("lm.on_policy_lambda / lm.seq_kd sample completions after a prompt: set "
                             "lm.prompt_tokens >= 1 (the first tokens of every window)")
        if lm.seq_kd and len(specs) != 1:
            raise ValueError(f"lm.seq_kd generates with one teacher, got {len(specs)}")
        if lm.topk_cache is not None and (lm.on_policy_lambda > 0 or lm.seq_kd or len(specs) != 1
                                          or lm.shard_teachers):
            raise ValueError("lm.topk_cache holds one teacher's top-k on the corpus tokens: it cannot score "
                             "on-policy or seq-KD samples, combine or shard teachers; drop those or the cache")
        if lm.topk_cache is not None and cfg.teacher.train is not None:
            raise ValueError("lm.topk_cache was written from a trained teacher: give teacher.checkpoint or "
                             "teacher.mlflow_uri (the weights `kdray cache` read), not teacher.train")
        if lm.seq_kd and lm.shard_teachers:
            raise ValueError("lm.seq_kd generates with the teacher on every worker; lm.shard_teachers keeps it on "
                             "one: set one of them false")
        if lm.combine == "weights" and (lm.weights is None or len(lm.weights) != len(specs)):
            raise ValueError(f"lm.weights needs one weight per teacher ({len(specs)}), got {lm.weights}")

    def plan(self, cfg):
        """[teachers on CE] -> per seed [the student on CE] + the student taught by ``lm.loss``."""
        stages, sources = [], []
        paths = cfg.teacher_paths()
        for i, (path, spec) in enumerate(paths):
            name = f"teacher-{i}" if len(paths) > 1 else "teacher"
            if spec.train is not None:
                stages.append(stage(name, KINDS["teacher"], cfg.seeds[0], path, spec.model, keep=True))
                sources.append(from_stage(name))
            else:
                sources.append(TeacherSource("spec", path))
        for seed in cfg.seeds:  # the baseline reads the teachers too: its held-out figures are under them
            if cfg.baseline:
                stages.append(stage(f"ce-seed{seed}", KINDS["scratch"], seed, "student", cfg.student.model,
                                    sources, methods="ce"))
            stages.append(stage(f"{cfg.lm.loss}-seed{seed}", KINDS["taught"], seed, "student", cfg.student.model,
                                sources, methods=cfg.lm.loss))
        return stages

    def check_data(self, cfg, splits):
        if getattr(splits.train, "windows", None) is None:
            raise ValueError(f"scheme 'lm' trains on token windows (data: {{name: lm_text}}); {cfg.data.name!r} "
                             f"is not an LM corpus")
        causal_lms = lm_models()
        for path, spec in [("student", cfg.student), *cfg.teacher_paths()]:
            if spec.model not in causal_lms:
                raise ValueError(f"scheme 'lm' trains causal language models ({', '.join(causal_lms)}); "
                                 f"{path} {spec.model!r} is not one")
        if cfg.lm.prompt_tokens >= splits.input_shape[0] - 1:
            raise ValueError(f"lm.prompt_tokens {cfg.lm.prompt_tokens} leaves no target in windows of "
                             f"{splits.input_shape[0]} tokens (data.options.seq_len)")

    def preflight(self, cfg, splits, example, student, teachers, orders):
        """Teachers share the student's tokenizer: the same vocabulary (the corpus's size; the same token ids
        where both models know their tokenizer)."""
        check_shared_vocabulary(student, teachers)
        for (path, _), teacher in zip(cfg.teacher_paths(), teachers):
            vocab = lm_vocab_size(teacher)
            if vocab != splits.num_classes:
                raise ValueError(f"{path}: its vocabulary has {vocab} tokens, the corpus's tokenizer "
                                 f"({cfg.data.options.get('tokenizer', 'chars')}) {splits.num_classes}; teachers "
                                 f"must share the student's tokenizer (cross-tokenizer distillation is out of scope)")

    def job_figures(self, cfg, rows):
        figure = perplexity_figure(cfg, rows)
        return {} if figure is None else {"lm_perplexity.png": figure}

    def run_stage(self, cfg, stage, splits, ctx, job_state, resume_loop):
        lm = cfg.lm
        spec = model_spec(cfg, stage.spec)
        optim = spec.train if stage.kind == KINDS["teacher"] else cfg.train
        seed_everything(stage.seed)
        model = create_model(spec.model, splits.num_classes, **spec.args).to(ctx.device)
        taught = stage.kind == KINDS["taught"]
        cache = read_topk_cache(cfg, splits, ctx.tracking_uri) if lm.topk_cache is not None and taught else None
        teachers = []
        for source in () if lm.topk_cache is not None else stage.teachers:  # the cache stands in for the teacher
            # built with the corpus's vocabulary (weights that do not fit fail to load), checked in preflight
            teacher = build_teacher_model(cfg, source, splits.num_classes, job_state.weights, ctx.tracking_uri)
            teachers.append(teacher.to(ctx.device).eval())
        if teachers and lm.teacher_dtype == "bfloat16" and not (lm.shard_teachers and ctx.world_size > 1):
            teachers = [t.to(torch.bfloat16) for t in teachers]
        if teachers and lm.shard_teachers and ctx.world_size > 1:  # one combined, sharded teacher module
            teachers = [ShardedLMTeachers(teachers, ctx.rank, ctx.world_size, rule=lm.combine, weights=lm.weights,
                                          teacher_dtype=torch.bfloat16 if lm.teacher_dtype == "bfloat16" else None,
                                          student_vocab_size=splits.num_classes, seed=stage.seed)]
        settings = LMLossSettings(loss=lm.loss if taught else "ce", temperature=lm.temperature, beta=lm.beta,
                                  skew_alpha=lm.skew_alpha, top_k=lm.top_k, chunk_tokens=lm.chunk_tokens,
                                  combine=lm.combine, weights=tuple(lm.weights) if lm.weights else None)
        source = (OnPolicySource(lm.on_policy_lambda, lm.seq_kd, lm.generation_temperature, seed=stage.seed)
                  if taught and (lm.on_policy_lambda > 0 or lm.seq_kd) else None)
        trainable = ctx.wrap(model)
        optimizer, scheduler = build_optimizer((p for p in trainable.parameters() if p.requires_grad), optim)
        logger, callbacks = stage_logging(cfg, stage, ctx, job_state, optim.epochs)
        device = ctx.device
        val = splits.val.windows.to(device)
        test = splits.test.windows.to(device)
        on_step = None
        if logger is not None:
            def on_step(step, losses):
                logger.buffer(step, {f"step_{name}": value for name, value in losses.items()})
        loop = LMTrainLoop(trainable, optimizer,
                           epoch_batches(splits.train.windows.to(device), optim.batch_size, stage.seed,
                                         ctx.rank, ctx.world_size, lm.prompt_tokens,
                                         cache if taught else None),
                           optim.epochs, settings, held_out=None, teachers=teachers, source=source,
                           log_every_steps=lm.log_every_steps,
                           grad_clip=lm.grad_clip, on_step=on_step)
        figures_teacher = (teachers[0] if len(teachers) == 1 else
                           CombinedTeachers(teachers, lm.combine, lm.weights) if teachers else None)

        def report(row_epoch: int) -> None:  # the held-out report in chunks (bounded memory), then samples
            row = loop.rows[-1] if loop.rows else None
            if row is not None:
                row.update({f"val_{k}": v for k, v in held_out_figures(
                    model, val, completion_mask(val, lm.prompt_tokens), figures_teacher).items()})
            if logger is not None and lm.generations and splits.decode is not None:
                prompt = max(lm.prompt_tokens, min(8, val.shape[1] // 2))  # samples fit the corpus's windows
                new_tokens = min(lm.generation_tokens, val.shape[1] - prompt)
                text = generations_text(model, val[: lm.generations], prompt, new_tokens, splits.decode,
                                        stage.seed * 1_000 + row_epoch, lm.generation_temperature)
                logger.log_epoch_text(row_epoch, text, "generations")

        stage_loop = LMStageLoop(loop, scheduler, callbacks, (test, completion_mask(test, lm.prompt_tokens)),
                                 model, figures_teacher, report)
        parts = StageParts(spec, optim, model, model, trainable, None, None, None, None, val[:2].cpu(), optimizer,
                           scheduler, logger, callbacks)
        extra = {"lm_loss": settings.loss, "vocab_size": splits.num_classes}
        if teachers and isinstance(teachers[0], ShardedLMTeachers):  # rank 0's row: the teachers it holds
            extra["teachers_on_worker"] = len(teachers[0].local)
        if figures_teacher is not None:
            extra.update({f"teacher_test_{k}": v for k, v in held_out_figures(
                figures_teacher, test, completion_mask(test, lm.prompt_tokens)).items() if k != "top1"})
        return complete_stage(cfg, stage, splits, ctx, job_state, parts, stage_loop, resume_loop, extra)
