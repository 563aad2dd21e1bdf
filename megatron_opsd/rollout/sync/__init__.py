"""Weight sync: how the trainer's weights reach the rollout engine, and the check that they did.

``base`` holds the config section, the protocol and the probe check; one module per strategy
(``inprocess``, ``disk``, ``distributed``); ``factory`` builds the one a run names.
"""
