"""Figures for a sweep's parent run: accuracy vs size (with the Pareto front), Optuna's Pareto front and
parameter importances (``optuna.visualization.matplotlib``; plotly is not a dependency)."""
from __future__ import annotations

import math
import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def accuracy_vs_size(trials, base: dict | None, x: str = "params", title: str = "sweep"):
    """Every trial's val top-1 against ``x`` (student parameters or latency): full-budget trials filled,
    ASHA-stopped ones hollow (their early score), the Pareto set joined, the base config as a star."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ok = trials[~trials["diverged"].astype(bool)] if len(trials) else trials
    full = ok[ok["full_budget"].astype(bool)] if len(ok) else ok
    stopped = ok[~ok["full_budget"].astype(bool)] if len(ok) else ok
    if len(stopped):
        ax.scatter(stopped[x], stopped["val_top1"], facecolors="none", edgecolors="tab:gray",
                   label="stopped by ASHA (early score)")
    if len(full):
        ax.scatter(full[x], full["val_top1"], color="tab:blue", label="full budget")
    front = ok[ok["pareto"].astype(bool)].sort_values(x) if len(ok) else ok
    if len(front):
        ax.step(front[x], front["val_top1"], where="post", color="tab:red", lw=1.2)
        ax.scatter(front[x], front["val_top1"], color="tab:red", zorder=3, label="Pareto set")
    if base and base.get(x) is not None and not math.isnan(base.get("val_top1", float("nan"))):
        ax.scatter([base[x]], [base["val_top1"]], marker="*", s=200, color="gold", edgecolors="black",
                   zorder=4, label="base config")
    if x == "params":
        ax.set_xscale("log")
    ax.set_xlabel("student parameters" if x == "params" else "latency (ms)")
    ax.set_ylabel("val top-1 (mean over seeds)")
    ax.set_title(f"{title}: accuracy vs {'size' if x == 'params' else 'latency'}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def rebuild_study(trials, distributions: dict, metrics: list[str], modes: list[str]):
    """An Optuna study holding the full-budget trials (ASHA-stopped ones as PRUNED), for Optuna's plots."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    directions = ["maximize" if m == "max" else "minimize" for m in modes]
    study = optuna.create_study(directions=directions) if len(directions) > 1 else \
        optuna.create_study(direction=directions[0])
    for _, row in trials.iterrows():
        params = {k: v for k, v in row["optuna_params"].items() if k in distributions}
        dists = {k: distributions[k] for k in params}
        try:
            params = {k: (v if not isinstance(d, optuna.distributions.IntDistribution) else int(v))
                      for (k, v), d in zip(params.items(), dists.values())}
            if bool(row["full_budget"]) and not bool(row["diverged"]):
                values = [float(row[m]) for m in metrics]
                trial = optuna.trial.create_trial(params=params, distributions=dists,
                                                  values=values if len(values) > 1 else None,
                                                  value=values[0] if len(values) == 1 else None)
            else:
                trial = optuna.trial.create_trial(params=params, distributions=dists,
                                                  state=optuna.trial.TrialState.PRUNED)
            study.add_trial(trial)
        except (ValueError, TypeError):
            continue
    return study


def optuna_figures(study, metrics: list[str]) -> tuple[dict, list[str]]:
    """(name -> Figure, notes on figures that could not be drawn)."""
    from optuna.visualization import matplotlib as ovm

    figures, notes = {}, []
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if len(metrics) > 1:
            try:
                ax = ovm.plot_pareto_front(study, target_names=metrics)
                figures["pareto_front.png"] = ax.figure
            except Exception as err:  # noqa: BLE001
                notes.append(f"pareto_front: {type(err).__name__}: {err}")
        if len(complete) >= 2:
            try:
                kwargs = {"target": (lambda t: t.values[0]), "target_name": metrics[0]} if len(metrics) > 1 else {}
                ax = ovm.plot_param_importances(study, **kwargs)
                ax.figure.set_size_inches(7, max(3.0, 0.45 * len(ax.get_yticklabels()) + 1.5))
                ax.figure.tight_layout()
                figures["param_importances.png"] = ax.figure
            except Exception as err:  # noqa: BLE001
                notes.append(f"param_importances: {type(err).__name__}: {err}")
        else:
            notes.append(f"param_importances: needs >= 2 full-budget trials, have {len(complete)}")
    return figures, notes


def close(fig) -> None:
    plt.close(fig)
