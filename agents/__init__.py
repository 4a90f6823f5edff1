"""The step API that users write against, and the reference agent steps.

- ``api``: the ``Step`` base class and the ``step`` decorator;
- ``schemas`` and ``topics``: event types, their data models, topic names;
- the reference steps, one module each: ``intake``, ``history`` (the
  ``context`` step), ``planner`` (with ``rule_planner`` and
  ``openai_planner``), ``gate`` (allow-all), ``executor`` (the ``tools``
  step, running ``agents.tools``) and ``responder``;
- ``pipeline``: the steps in order; ``testing``: an in-process driver;
- ``model_client``: an OpenAI-compatible chat completions client (one pooled
  HTTP session per process, retries, per-endpoint concurrency and rate
  limits, token usage) for the planner and for users' own steps, with
  ``model_limits`` and ``model_metrics`` beside it.

Nothing here imports ``sluicegate``; only ``streams`` and third-party code.
"""
