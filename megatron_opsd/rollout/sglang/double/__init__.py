"""A test double of an SGLang 0.5.23 server (``opsd serve``): a working fake backed by the embedded
engine, for CPU fleets (CI, laptops) where SGLang itself cannot run. The server's state and
scheduler are ``scheduler.py``; its HTTP routes, by family, ``routes.py``.

It speaks the subset of SGLang's HTTP API the product uses, with SGLang's JSON shapes, status codes
and blocking behaviour (``rollout/sglang/protocol.py`` and the notes behind it): ``/generate``
(single and batch; blocks while paused; an aborted request is a 200 with its partial tokens and
finish reason ``abort``; an unknown ``sampling_params`` key is a 400), ``/pause_generation``
(``abort``: nothing runs when it returns; ``retract``: running requests go back to the queue and
start again after ``/continue_generation``; ``in_place``: the running batch finishes, nothing new
starts), ``/flush_cache`` (400 while requests run or wait), ``/abort_request`` (by rid prefix),
``/v1/loads``, ``/model_info``, ``/server_info``, ``/update_weights_from_disk`` (a directory
that does not fit leaves the weights as they were; without a ``load_format`` it loads with the
server's ``--load-format``, so a server started with ``dummy`` refuses, as SGLang's does),
``/update_weight_version``, and the
weight-update group: ``/init_weights_update_group``, ``/begin_weight_update``,
``/update_weights_from_distributed`` (``flattened_bucket`` too), ``/end_weight_update``,
``/destroy_weights_update_group``. ``weight_version`` is in
``/model_info`` and every reply's ``meta_info``. With ``--api-key`` every endpoint but
``/health*`` and ``/metrics*`` wants ``Authorization: Bearer <key>`` (401 otherwise), as in SGLang,
whose router probes ``/health`` without the key.

Its flags are ``sglang.launch_server``'s for what it supports, so a fleet starts either with the
same command line. Requests are batched (same sampling settings, up to ``--max-running-requests``).
As in SGLang, a request's ``sampling_seed`` is honoured only with ``--enable-deterministic-inference``
(42 when a request names none); then each is sampled with its own seed, as the embedded engine samples
a seeded sequence, so a fleet of doubles gives the rollouts of the embedded engine. Without the
flag every request samples from a fresh seed. Input log-probs (``logprob_start_len=0``) are the raw
logits' ``log_softmax`` whatever the request's temperature, as SGLang's are; sampled tokens'
log-probs are at the request's temperature. ``/health`` runs SGLang's check: unless
``SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=0``, it answers 200 once the scheduler could serve a
one-token generation, checked every second, and 503 after ``SGLANG_HEALTH_CHECK_TIMEOUT`` (20 s)
without (paused, or loading weights); ``/health_generate`` always does so. What it does not model:
SGLang's radix cache and memory limits, streaming, text prompts (``--skip-tokenizer-init``
behaviour only), tensor parallelism beyond 1 (``--tp-size`` must be 1), and ``in_place``
freezing a running batch mid-way.
"""
from megatron_opsd.rollout.sglang.double.routes import build_app
from megatron_opsd.rollout.sglang.double.scheduler import Scheduler

__all__ = ["Scheduler", "build_app"]
