"""Search (Ray Tune + Optuna): turns a search space over student architecture and distillation
hyper-parameters plus a base config into Tune trials (TPE / NSGA-II sampler, ASHA early stopping),
each trial a distillation run from the engine, each tracked as a nested MLflow run."""
