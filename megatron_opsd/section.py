"""Base class for every config section: typed, validated, unknown keys are errors.

Section modules (loss, data, model, ...) define their own ``Section`` subclasses next to the code
that reads them; ``megatron_opsd.config`` composes them into one tree. Sections never import
``config`` so that the tree can import them without cycles.
"""
from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # A key that is a Python keyword (rollout.async) is a field with an alias: read and written by it.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, serialize_by_alias=True)
