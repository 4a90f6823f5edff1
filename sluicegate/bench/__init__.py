"""The benchmark harness behind ``sluice bench``.

It owns measuring sluicegate against its own clients, in one run and as
ratios (the machines are shared and noisy): the transport mode (publish and
consume through our ``Transport`` beside the raw nats-py / aiokafka clients),
the step mode (one stateful step on the real ``StepRunner`` with Postgres
checkpoints, beside a bare consume→produce loop and Faust), and what turns the
results into a table, the JSON of DESIGN.md's CLI contract and a plot.

Modules:

- ``latency``: message stamps, warm-up, HDR histogram percentiles;
- ``endpoints``: one interface over our transports and the raw clients;
- ``transport_mode`` / ``step_mode`` / ``pipeline_mode``: the measurements;
- ``model_latency``: ``--model-latency``, the pipeline with a slow model beside
  an instant one; ``model_standin``: the loopback OpenAI-compatible model it
  asks; ``rss``: the worker's memory over a run;
- ``step_work``: the stateful, policy-gate-like step both engines run;
- ``report``, ``plot``, ``environment``: what gets written out.
"""
