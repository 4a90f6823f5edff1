"""The policy gate (a step), the Rego engine wrapper and the decision model.

- ``gate``: the ``gate`` step (actions.proposed → actions.allowed / denied),
  hot reload, shadow bundles;
- ``evaluator``: one loaded bundle deciding, failing closed;
- ``engine``: the regorus back ends (RVM, interpreter) behind a protocol;
- ``bundle``: loading a bundle directory and its content-hash version;
- ``features``: the policy input (PII findings, URL host, sizes);
- ``decision``: the decision model and the strict check of policy output;
- ``ledger``: spend and rate window in the session's keyed state;
- ``cache``: the exact decision cache;
- ``lint``: ``sluice policy check``;
- ``schemas``: the event data the gate reads and the topics it writes;
- ``testing``: helpers to drive the gate by hand.

``policy/rego/`` holds the reference policies and their data. This package
imports only ``streams`` and third-party libraries.
"""
