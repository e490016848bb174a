"""Search spaces: a YAML/dict spec or a Python define-by-run function, sampled through Optuna.

A space maps *parameter paths* of a job config to distributions::

    student.model:                        # a choice whose options open conditional blocks
      choice:
        digits_mlp:
          student.args.hidden: {int: [8, 64], log: true}
          student.args.depth: {int: [1, 3]}
        "resnet{depth}":                  # a family: the name is filled from a local variable
          depth: {choice: [8, 14, 20]}
          student.args.width_mult: {float: [0.25, 1.0]}
    methods:
      choice:
        kd:  {_value: [{name: kd}], methods.0.temperature: {float: [1, 8]}}
        dkd: {_value: [{name: dkd}], methods.0.beta: {float: [1, 8]}}
    train.lr: {float: [0.01, 0.2], log: true}
    train.batch_size: {choice: [32, 64]}

Forms: ``{int: [lo, hi]}`` / ``{float: [lo, hi]}`` (options ``log``, ``step``), ``{choice: [values]}``,
``{choice: {label: block}}`` (a block is ``null`` or a mapping of further parameters, with ``_value`` for
the value to set when it is not the label itself), ``{value: X}`` or a plain value (a constant).

Conditional parameters get Optuna names ``<path>@<label>`` so that two branches may give the same path
different ranges. The space is sampled by :meth:`Space.__call__`, Optuna's define-by-run form, which is
what ``OptunaSearch`` takes for conditional spaces. :meth:`Space.resolve` turns a sampled Tune config
back into ``(path, value)`` pairs, and :func:`apply_params` writes those into a job config.

Everything a user can get wrong is checked by :meth:`Space.validate` before any trial starts, each
failure a one-line :class:`~kdray.config.ConfigError`.
"""
from __future__ import annotations

import copy
import itertools
import re
import string
from dataclasses import dataclass, field
from typing import Any, Callable, Union, get_args, get_origin

from kdray.config import ConfigError

#: Top-level config keys a space may set. The teacher is trained once per sweep, the data split and the
#: seeds must be those of the base configuration (so accuracies compare), placement comes from ``search``.
SEARCHABLE_ROOTS = ("student", "methods", "ce_weight", "train")
_FIXED_ROOTS = {
    "teacher": "the teacher is trained once per sweep, before the trials",
    "data": "every trial must use the base configuration's data split",
    "seeds": "set search.seeds instead",
    "name": "trial names come from Tune's trial ids",
    "output_dir": "trials run under the sweep's directory",
    "ray": "set search.workers_per_trial / search.cpus_per_trial instead",
    "mlflow": "trials are tracked in the sweep's MLflow experiment",
    "checkpoint": "the sweep sets checkpointing",
    "baseline": "trials train distilled students only",
    "scheme": "not searchable",
}


def scheme_sections() -> list[str]:
    """Config sections a scheme owns (``data_free``, ``adversarial``, ...): searchable, except the teachers,
    which a sweep trains once. A section of another scheme than the base's fails in the trial config check."""
    from kdray.orchestrator.plan import section_owners

    return [s for s in section_owners() if s not in ("teacher", "teachers")]


_SCALARS = (str, int, float, bool, type(None))
_TYPED_KEYS = ("choice", "int", "float", "value")
_OPTIONS = {"int": {"log", "step"}, "float": {"log", "step"}, "choice": set(), "value": set()}
#: Most option combinations checked per space before the sweep starts.
MAX_CHECKED = 256


@dataclass
class Branch:
    label: Any
    value: Any  # what the choice sets (the label unless ``_value`` was given)
    params: list["Param"] = field(default_factory=list)


@dataclass
class Param:
    key: str  # a config path (``train.lr``) or a local variable used in a template (``depth``)
    name: str  # the Optuna parameter name
    kind: str  # int | float | choice | const
    where: str  # for messages: ``space.student.model=digits_mlp.student.args.hidden``
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: list = field(default_factory=list)
    branches: dict | None = None  # label -> Branch, for conditional choices
    value: Any = None

    @property
    def is_path(self) -> bool:
        return "." in self.key or self.key in SEARCHABLE_ROOTS or self.key in _FIXED_ROOTS

    def distribution(self):
        import optuna.distributions as od

        if self.kind == "int":
            return od.IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        if self.kind == "float":
            return od.FloatDistribution(float(self.low), float(self.high), log=self.log, step=self.step)
        if self.kind == "choice":
            return od.CategoricalDistribution(list(self.choices))
        return None

    def corners(self) -> list:
        """Values the pre-flight check tries: both ends of a range, every option of a choice."""
        if self.kind in ("int", "float"):
            return [self.low, self.high] if self.low != self.high else [self.low]
        if self.kind == "choice":
            return list(self.choices)
        return [self.value]

    def all_values(self, limit: int = 256) -> list | None:
        """Every value (for grids and template checks); None when a range is continuous or too long."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "const":
            return [self.value]
        if self.kind == "int":
            step = int(self.step or 1)
            values = list(range(int(self.low), int(self.high) + 1, step))
            return values if len(values) <= limit else None
        if self.kind == "float" and self.step:
            n = int(round((self.high - self.low) / self.step)) + 1
            return [self.low + i * self.step for i in range(n)] if n <= limit else None
        return None


def _template_vars(value) -> list[str]:
    if not isinstance(value, str) or "{" not in value:
        return []
    try:
        return [f for _, f, _, _ in string.Formatter().parse(value) if f]
    except ValueError:
        return []


def _fill(value, local: dict):
    if isinstance(value, str) and _template_vars(value):
        return value.format(**local)
    if isinstance(value, list):
        return [_fill(v, local) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, local) for k, v in value.items()}
    return value


def check_path(path: str, where: str) -> None:
    """Raise a one-line :class:`ConfigError` unless ``path`` names a searchable field of a job config."""
    import difflib

    from pydantic import BaseModel

    from kdray.config import Config

    parts = path.split(".")
    root = parts[0]
    if root in _FIXED_ROOTS:
        raise ConfigError(f"{where}: {path!r} cannot be searched ({_FIXED_ROOTS[root]})")
    if root not in SEARCHABLE_ROOTS and root not in scheme_sections() and root in Config.model_fields:
        raise ConfigError(f"{where}: {path!r} cannot be searched (a sweep searches "
                          f"{', '.join(SEARCHABLE_ROOTS)} and the schemes' sections: "
                          f"{', '.join(scheme_sections())})")
    node: Any = Config
    for i, part in enumerate(parts):
        sofar = ".".join(parts[: i + 1])
        if isinstance(node, type) and issubclass(node, BaseModel):
            fields = node.model_fields
            if part not in fields:
                if node.model_config.get("extra") == "allow":
                    return  # method parameters: checked against the method when configs are built
                allowed = sorted(fields)
                close = difflib.get_close_matches(part, allowed, n=1)
                hint = f" (did you mean {'.'.join(parts[:i] + close)}?)" if close else ""
                raise ConfigError(f"{where}: unknown parameter {path!r}{hint}; "
                                  f"{'.'.join(parts[:i]) or 'the config'} has {', '.join(allowed)}")
            node = _unwrap(fields[part].annotation)
            continue
        if get_origin(node) is dict:
            return  # free-form (student.args: checked against the model's knobs when configs are built)
        if get_origin(node) is list:
            if not part.isdigit():
                raise ConfigError(f"{where}: {sofar!r}: list items are addressed by index, e.g. methods.0.alpha")
            node = _unwrap(get_args(node)[0])
            continue
        raise ConfigError(f"{where}: unknown parameter {path!r} ({'.'.join(parts[:i])!r} has no sub-keys)")


def _unwrap(annotation):
    """``X | None`` -> ``X``."""
    if get_origin(annotation) is Union or type(annotation).__name__ == "UnionType":
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


class Space:
    """A parsed space spec: sampled by Optuna (define-by-run), resolved into config paths, validated."""

    def __init__(self, spec: dict):
        if not isinstance(spec, dict) or not spec:
            raise ConfigError("space: give a non-empty mapping of parameter paths to distributions")
        self.spec = spec
        self._names: set[str] = set()
        self.params = self._parse_block(spec, labels=[], template_vars=set(), where="space")

    # --- parsing -----------------------------------------------------------------------------
    def _parse_block(self, block: dict, labels: list[str], template_vars: set[str], where: str) -> list[Param]:
        params = []
        for key, spec in block.items():
            if not isinstance(key, str) or not key:
                raise ConfigError(f"{where}: parameter names must be strings, got {key!r}")
            if key == "_value":
                continue
            here = f"{where}.{key}"
            if "." in key or key in SEARCHABLE_ROOTS or key in _FIXED_ROOTS:
                check_path(key, here)
            elif key not in template_vars:
                hint = (f"; a local variable must appear in its branch's name, e.g. 'resnet{{{key}}}'"
                        if labels else "")
                raise ConfigError(f"{here}: unknown parameter {key!r} (not a config path such as train.lr or "
                                  f"student.args.{key}){hint}")
            name = key if not labels else f"{key}@{labels[-1]}"
            if name in self._names:
                name = f"{key}@{'/'.join(labels)}".replace("/", ":")
            if name in self._names:
                raise ConfigError(f"{here}: parameter {key!r} appears twice in the same branch")
            self._names.add(name)
            params.append(self._parse_param(key, name, spec, labels, here))
        return params

    def _parse_param(self, key: str, name: str, spec, labels: list[str], where: str) -> Param:
        typed = isinstance(spec, dict) and any(k in spec for k in _TYPED_KEYS)
        if not typed:
            return Param(key, name, "const", where, value=spec)
        kinds = [k for k in _TYPED_KEYS if k in spec]
        if len(kinds) > 1:
            raise ConfigError(f"{where}: give one of {', '.join(_TYPED_KEYS)}, not {' and '.join(kinds)}")
        kind = kinds[0]
        unknown = sorted(set(spec) - {kind} - _OPTIONS[kind])
        if unknown:
            allowed = sorted(_OPTIONS[kind]) or ["none"]
            raise ConfigError(f"{where}: unknown option(s) {unknown} for {kind} (allowed: {', '.join(allowed)})")
        if kind == "value":
            return Param(key, name, "const", where, value=spec["value"])
        if kind in ("int", "float"):
            return self._parse_range(key, name, kind, spec, where)
        return self._parse_choice(key, name, spec["choice"], labels, where)

    @staticmethod
    def _parse_range(key, name, kind, spec, where) -> Param:
        bounds = spec[kind]
        if not (isinstance(bounds, (list, tuple)) and len(bounds) == 2
                and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)):
            raise ConfigError(f"{where}: {kind} needs [low, high], got {bounds!r}")
        low, high = bounds
        if kind == "int" and not all(float(b).is_integer() for b in bounds):
            raise ConfigError(f"{where}: int bounds must be integers, got {bounds!r}")
        if low > high:
            raise ConfigError(f"{where}: empty range [{low}, {high}] (low > high)")
        log = bool(spec.get("log", False))
        if log and low <= 0:
            raise ConfigError(f"{where}: a log range needs low > 0, got [{low}, {high}]")
        step = spec.get("step")
        if step is not None and (not isinstance(step, (int, float)) or step <= 0):
            raise ConfigError(f"{where}: step must be > 0, got {step!r}")
        if step is not None and log:
            raise ConfigError(f"{where}: step and log cannot be combined")
        if kind == "int":
            low, high = int(low), int(high)
            if step is not None and not float(step).is_integer():
                raise ConfigError(f"{where}: an int step must be an integer, got {step!r}")
        else:
            low, high = float(low), float(high)
        return Param(key, name, kind, where, low=low, high=high, log=log, step=step)

    def _parse_choice(self, key, name, options, labels, where) -> Param:
        if isinstance(options, (list, tuple)):
            if not options:
                raise ConfigError(f"{where}: empty choice")
            bad = [o for o in options if not isinstance(o, _SCALARS)]
            if bad:
                raise ConfigError(f"{where}: choice values must be scalars (got {bad[0]!r}); for lists or "
                                  f"mappings use labelled options: {{choice: {{label: {{_value: ...}}}}}}")
            if len(set(map(repr, options))) != len(options):
                raise ConfigError(f"{where}: choice lists a value twice: {list(options)}")
            return Param(key, name, "choice", where, choices=list(options))
        if not isinstance(options, dict) or not options:
            raise ConfigError(f"{where}: choice needs a non-empty list or a mapping of labelled options")
        branches = {}
        for label, block in options.items():
            if not isinstance(label, _SCALARS):
                raise ConfigError(f"{where}: option labels must be scalars, got {label!r}")
            if block is not None and not isinstance(block, dict):
                raise ConfigError(f"{where}.{label}: an option's block must be a mapping of parameters or null, "
                                  f"got {block!r}")
            block = block or {}
            value = block.get("_value", label)
            tvars = set(_template_vars(label)) | set(_template_vars(value))
            local_keys = {k for k in block if k != "_value" and "." not in k and k not in SEARCHABLE_ROOTS}
            missing = sorted(tvars - local_keys)
            if missing:
                raise ConfigError(f"{where}.{label}: the name uses {{{missing[0]}}} but the block does not define "
                                  f"{missing[0]!r}")
            sub = self._parse_block(block, labels + [str(label)], tvars, f"{where}={label}")
            branches[label] = Branch(label, value, sub)
        return Param(key, name, "choice", where, choices=list(branches), branches=branches)

    # --- sampling ----------------------------------------------------------------------------
    def __call__(self, trial) -> None:
        """Optuna define-by-run: suggest every active parameter (conditional blocks only when chosen)."""
        self._suggest(self.params, trial)
        return None

    def _suggest(self, params: list[Param], trial) -> None:
        for p in params:
            if p.kind == "int":
                trial.suggest_int(p.name, int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
            elif p.kind == "float":
                trial.suggest_float(p.name, p.low, p.high, log=p.log, step=p.step)
            elif p.kind == "choice":
                label = trial.suggest_categorical(p.name, p.choices)
                if p.branches is not None:
                    self._suggest(p.branches[label].params, trial)

    def distributions(self) -> dict:
        out = {}

        def walk(params):
            for p in params:
                if p.kind != "const":
                    out[p.name] = p.distribution()
                for b in (p.branches or {}).values():
                    walk(b.params)

        walk(self.params)
        return out

    # --- resolving ---------------------------------------------------------------------------
    def resolve(self, config: dict) -> list[tuple[str, Any]]:
        """A sampled Tune/Optuna config (Optuna names) -> ordered ``(path, value)`` pairs for the job."""
        out: list[tuple[str, Any]] = []
        self._resolve(self.params, config, out, {})
        return out

    def _resolve(self, params, config, out, local) -> None:
        for p in params:
            if p.kind == "const":
                value = p.value
            else:
                if p.name not in config:
                    raise KeyError(f"sampled config has no value for {p.name!r}")
                value = config[p.name]
            if p.kind == "choice" and p.branches is not None:
                branch = p.branches[value]
                sub_out: list[tuple[str, Any]] = []
                sub_local = dict(local)
                self._resolve(branch.params, config, sub_out, sub_local)
                value = _fill(copy.deepcopy(branch.value), sub_local)
                self._emit(p, value, out, local)
                out.extend(sub_out)
                continue
            self._emit(p, value, out, local)

    @staticmethod
    def _emit(p: Param, value, out, local) -> None:
        if p.is_path:
            out.append((p.key, value))
        else:
            local[p.key] = value

    # --- grids and checks --------------------------------------------------------------------
    def grid(self) -> dict[str, list]:
        """Every value of every parameter, for a full grid (Optuna's ``GridSampler``)."""
        grid = {}
        for p in self.params:
            if p.branches is not None:
                raise ConfigError(f"{p.where}: a grid cannot have conditional blocks; list plain values")
            if p.kind == "const":
                continue
            values = p.all_values()
            if values is None:
                raise ConfigError(f"{p.where}: a grid needs a finite set of values (a choice, an int range "
                                  f"or a float range with step)")
            grid[p.name] = values
        return grid

    def check_configs(self) -> list[tuple[str, dict]]:
        """Sampled configs (Optuna names) that cover every option combination and both ends of every range,
        each with a description for error messages. Capped at :data:`MAX_CHECKED`."""
        out = []
        for combo in itertools.islice(self._branch_combos(self.params), MAX_CHECKED):
            # combo: {choice name: label} for every conditional choice on this path
            active = self._active(self.params, combo)
            variants = [{p.name: p.low for p in active if p.kind in ("int", "float")},
                        {p.name: p.high for p in active if p.kind in ("int", "float")}]
            plain = [p for p in active if p.kind == "choice" and p.branches is None]
            templates = [p for p in active if p.kind != "const" and not p.is_path]
            for base in variants:
                base.update(combo)
                for p in plain:
                    base.setdefault(p.name, p.choices[0])
                for p in templates:
                    base.setdefault(p.name, p.corners()[0])
            extra = []
            for p in plain + templates:
                values = p.all_values() or p.corners()
                for v in values:
                    extra.append({**variants[0], p.name: v})
            seen, configs = set(), []
            for cfg in variants + extra:
                key = repr(sorted(cfg.items(), key=lambda kv: kv[0]))
                if key not in seen:
                    seen.add(key)
                    configs.append(cfg)
            for cfg in configs:
                out.append((self.describe(cfg), cfg))
        return out

    def _branch_combos(self, params):
        """Every combination of conditional options (depth-first)."""
        conds = [p for p in params if p.branches is not None]
        if not conds:
            yield {}
            return
        per_param = []
        for p in conds:
            options = []
            for label, branch in p.branches.items():
                for sub in self._branch_combos(branch.params):
                    options.append({p.name: label, **sub})
            per_param.append(options)
        for parts in itertools.product(*per_param):
            merged = {}
            for part in parts:
                merged.update(part)
            yield merged

    def _active(self, params, combo) -> list[Param]:
        out = []
        for p in params:
            out.append(p)
            if p.branches is not None:
                out.extend(self._active(p.branches[combo[p.name]].params, combo))
        return out

    def describe(self, config: dict) -> str:
        pairs = []
        local: dict = {}
        try:
            resolved = self.resolve(config)
        except Exception:  # noqa: BLE001
            resolved = []
        self._locals(self.params, config, local)
        for path, value in resolved:
            if isinstance(value, (list, dict)):
                continue
            pairs.append(f"{path}={value}")
        pairs += [f"{k}={v}" for k, v in local.items()]
        return ", ".join(pairs)

    def _locals(self, params, config, local):
        for p in params:
            if not p.is_path and p.name in config:
                local[p.key] = config[p.name]
            if p.branches is not None and p.name in config:
                self._locals(p.branches[config[p.name]].params, config, local)

    def max_value(self, path: str):
        """The largest value ``path`` can take in this space (e.g. ``train.epochs`` for ASHA's max_t)."""
        best = None

        def walk(params):
            nonlocal best
            for p in params:
                if p.key == path:
                    vals = [p.high] if p.kind in ("int", "float") else (
                        p.choices if p.kind == "choice" and p.branches is None else [p.value])
                    for v in vals:
                        if isinstance(v, (int, float)) and not isinstance(v, bool):
                            best = v if best is None else max(best, v)
                for b in (p.branches or {}).values():
                    walk(b.params)

        walk(self.params)
        return best

    def constant_values(self) -> list:
        """Every ``_value`` / constant in the space (used to find method warm-ups)."""
        found = []

        def walk(params):
            for p in params:
                if p.kind == "const":
                    found.append((p.key, p.value))
                elif p.kind in ("int", "float"):
                    found.append((p.key, p.high))
                for b in (p.branches or {}).values():
                    found.append((p.key, b.value))
                    walk(b.params)

        walk(self.params)
        return found


class CallableSpace:
    """A Python define-by-run function ``fn(trial) -> dict | None`` whose suggested names are config paths
    (``trial.suggest_float("train.lr", ...)``); the dict it returns adds fixed or derived values
    (``{"student.model": f"resnet{depth}"}``). Names that are not config paths are local helpers."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __getstate__(self):
        """Pickle the function by value, so workers need not import the module that defines it (a script,
        a notebook, a test module)."""
        import sys

        import cloudpickle

        module = sys.modules.get(getattr(self.fn, "__module__", "") or "")
        by_value = module is not None and module.__name__ not in ("__main__", "builtins") and \
            not module.__name__.startswith(("kdray.", "optuna", "ray"))
        if by_value:
            cloudpickle.register_pickle_by_value(module)
        try:
            return {"fn": cloudpickle.dumps(self.fn)}
        finally:
            if by_value:
                cloudpickle.unregister_pickle_by_value(module)

    def __setstate__(self, state):
        """Runs only inside an unpickling by Ray or Tune, of bytes that came with the outer pickle (so no
        trust is added): Ray's transport of the space to its workers, and ``Tuner.restore`` loading the
        searcher state (``OptunaSearch`` pickles its ``__dict__``, this space included) from the sweep's own
        ``tune/`` directory; kdray loads none from elsewhere (see ``repair_tune_state``)."""
        import cloudpickle

        self.fn = cloudpickle.loads(state["fn"])

    def __call__(self, trial):
        ret = self.fn(trial)
        if ret is not None and not isinstance(ret, dict):
            raise TypeError(f"the space function must return a dict or None, got {type(ret).__name__}")
        return ret

    def resolve(self, config: dict) -> list[tuple[str, Any]]:
        out = []
        for key, value in config.items():
            if isinstance(key, str) and ("." in key or key in SEARCHABLE_ROOTS):
                out.append((key, value))
        return out

    def describe(self, config: dict) -> str:
        return ", ".join(f"{k}={v}" for k, v in config.items() if not isinstance(v, (list, dict)))

    def probe(self, n: int = 16, seed: int = 0) -> tuple[list[tuple[str, dict]], dict]:
        """Run the function on ``n`` random Optuna trials: (sampled configs, distributions seen)."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        configs, dists = [], {}
        for _ in range(n):
            trial = study.ask()
            try:
                ret = self(trial)
            except ConfigError:
                raise
            except Exception as err:  # noqa: BLE001  (user code)
                first = str(err).splitlines()[0] if str(err) else ""
                raise ConfigError(f"space function: {type(err).__name__}: {first}") from None
            cfg = {**trial.params, **(ret or {})}
            for key in cfg:
                if isinstance(key, str) and ("." in key or key in SEARCHABLE_ROOTS or key in _FIXED_ROOTS):
                    check_path(key, "space function")
            dists.update(trial.distributions)
            configs.append((self.describe(cfg), cfg))
            study.tell(trial, 0.0)
        return configs, dists

    def max_value(self, path: str):
        return None

    def constant_values(self) -> list:
        return []


def make_space(space) -> Space | CallableSpace:
    if isinstance(space, (Space, CallableSpace)):
        return space
    if callable(space):
        return CallableSpace(space)
    return Space(space)


_INDEX = re.compile(r"^\d+$")


def apply_params(raw: dict, params: list[tuple[str, Any]], where: str = "space") -> dict:
    """Write ``(path, value)`` pairs into a job config dict (a copy). Shorter paths go first, so a whole
    ``methods`` list is set before ``methods.0.temperature``. Choosing a student model other than the
    base's drops the base's ``student.args`` (they are knobs of another model)."""
    raw = copy.deepcopy(raw)
    base_model = raw.get("student", {}).get("model")
    for path, value in sorted(params, key=lambda pv: pv[0].count(".")):
        parts = path.split(".")
        if path == "student.model" and value != base_model:
            raw.setdefault("student", {})["args"] = {}
        node = raw
        for i, part in enumerate(parts[:-1]):
            nxt = parts[i + 1]
            if isinstance(node, list):
                idx = int(part)
                if idx >= len(node):
                    raise ConfigError(f"{where}: {path!r}: {'.'.join(parts[:i]) or 'list'} has only {len(node)} "
                                      f"item(s)")
                node = node[idx]
            else:
                if part not in node or node[part] is None:
                    node[part] = [] if _INDEX.match(nxt) else {}
                node = node[part]
        last = parts[-1]
        if isinstance(node, list):
            idx = int(last)
            if idx >= len(node):
                raise ConfigError(f"{where}: {path!r}: the list has only {len(node)} item(s)")
            node[idx] = copy.deepcopy(value)
        else:
            node[last] = copy.deepcopy(value)
    return raw
