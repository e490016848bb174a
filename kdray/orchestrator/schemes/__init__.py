"""The built-in distillation schemes, one module each: offline, online, self_distill, assistant, multi_teacher,
adversarial, data_free, deep_inversion, quantized, graph, lifelong, cross_modal, rco, lm.

Each module subclasses :class:`kdray.orchestrator.plan.Scheme` and registers it with ``@register_scheme``;
:func:`kdray.orchestrator.plan.load_schemes` imports them by name (``plan.BUILTIN_SCHEMES``) on the
registry's first use. A third-party scheme is the same kind of module, made known through the entry point
group ``kdray.schemes`` (or imported before the config is validated).
"""
