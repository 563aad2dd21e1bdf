"""megatron-opsd: On-Policy Self-Distillation on Megatron-core."""

__version__ = "0.1.0"
