"""The Faust engine: sluicegate's steps as agents of a faust-streaming app (``--engine faust``).

It owns the mapping of the native step runtime onto Faust: a ``Transport``
and ``Subscription`` backed by a Faust app (agents consume, Faust's producer
produces, Faust's group assigns partitions and commits offsets), the state
tables mirrored from Postgres, and the rebalance bridge that makes Faust
resume where Postgres says. The per-event work is the native
``streams.runner.StepRunner``'s, unchanged, so checkpoints, audit rows,
results, dead letters and outputs are those of the native engine.

Kafka only. Faust is imported only when this package is.
"""

from sluicegate.faust_engine.runtime import FaustEngineError, run_faust_steps

__all__ = ["FaustEngineError", "run_faust_steps"]
