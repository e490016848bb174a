"""online: K peers learn from each other (DML) or from their ensemble; no pre-trained teacher."""
from __future__ import annotations

from kdray.orchestrator.online import run_online_stage
from kdray.orchestrator.plan import Scheme, method_label, no_teacher, register_scheme, stage


@register_scheme
class Online(Scheme):
    name = "online"
    help = ("K peers learn from each other: DML or their ensemble (online.peers, online.mode; "
            "methods between peers; ray.num_workers = K x D)")
    sections = ("online",)
    own_stage_kinds = ("online", "independent")

    def check(self, cfg):
        if "methods" not in cfg.model_fields_set:
            cfg.__dict__["methods"] = []  # peers learn from each other's logits; terms between them are opt-in
        k = len(cfg.online.peers)
        if k < 2:
            raise ValueError(f"scheme 'online' needs at least 2 online.peers, got {k}")
        if cfg.ray.num_workers > 1 and cfg.ray.num_workers % k:
            raise ValueError(f"scheme 'online' with {k} peers needs ray.num_workers = {k} x D (one peer per worker, "
                             f"D data-parallel replicas of each) or 0/1 (all peers in one process), "
                             f"got {cfg.ray.num_workers}")
        no_teacher(cfg)

    def plan(self, cfg):
        """Per seed [the peers trained independently] + the cohort; each peer gets its own MLflow run."""
        peers = [p.model for p in cfg.online.peers]
        stages = []
        for seed in cfg.seeds:
            if cfg.baseline:
                stages.append(stage(f"independent-seed{seed}", "independent", seed, "online.peers", "peers",
                                    peers=peers))
            stages.append(stage(f"{cfg.online.mode}-seed{seed}", "online", seed, "online.peers", "peers",
                                peers=peers, methods=method_label(cfg)))
        return stages

    def models(self, cfg):
        return [(f"online.peers.{i}", spec) for i, spec in enumerate(cfg.online.peers)]

    def run_stage(self, cfg, stage, splits, ctx, job_state, resume_loop):
        return run_online_stage(cfg, stage, splits, ctx, job_state, resume_loop)
