"""Data: rows with privileged solutions -> prompts -> samples -> packed micro-batches.

- ``sources``: read and validate rows (hub or local), field mapping, resumable shuffled iterator.
- ``prompts``: student / teacher / eval prompts via the chat template; length policy.
- ``sample``: the per-sample contract between rollouts and the training step.
- ``packing``: one- or two-sided packing into micro-batches (block-diagonal masks, per-token values).
- ``batching``: the data-parallel split of a step's samples and each rank's micro-batches.
"""
