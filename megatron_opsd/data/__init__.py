"""Data for OPSD: rows with privileged solutions -> prompts -> sequence pairs -> packed micro-batches.

- ``sources``: read and validate rows (hub or local), field mapping, resumable shuffled iterator.
- ``prompts``: student / teacher / eval prompts via the chat template; sequence pairs; length policy.
- ``packing``: pair-aware packing into micro-batches (THD metadata, block-diagonal masks).
- ``preview``: the ``opsd data preview`` command.
"""
