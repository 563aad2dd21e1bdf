"""Rollouts from a fleet of SGLang servers behind sglang-router, and ``opsd serve``, its CPU stand-in."""
