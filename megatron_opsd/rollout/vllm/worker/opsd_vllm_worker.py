"""Loaded by each vLLM worker (``--worker-extension-cls opsd_vllm_worker.WeightReload``), inside the
vLLM server's own environment: it imports nothing of megatron-opsd, and its directory holds only it
(the fleet puts that directory on the server's PYTHONPATH).

``opsd_reload`` is vLLM's in-place ``reload_weights`` fed with the tensors of a Hugging Face
directory's safetensors files (read one tensor at a time; vLLM's own loading from a path refuses
a server started with ``--load-format dummy``), plus the step vLLM 0.32's CPU path misses for tied
embeddings: on CPU every linear layer is prepacked (oneDNN) after loading, the tied output layer
included, and a reload re-packs the linear layers but not the tied head, so logits would keep
coming from the old embedding. The head is re-packed here; the trainer's probe check after every
sync is what shows the difference (``refresh_tied_head=False`` reproduces the bug).
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path


def hf_tensors(path: str) -> Iterator[tuple[str, object]]:
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    for file in files:
        with safe_open(str(file), framework="pt") as shard:
            for name in shard.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, shard.get_tensor(name)


class WeightReload:
    """Mixed into vLLM's worker class: ``self`` is the worker."""

    def opsd_reload(self, path: str, refresh_tied_head: bool = True) -> str:
        self.model_runner.reload_weights(weights_iterator=hf_tensors(path))
        model = self.model_runner.get_model()
        head = getattr(model, "lm_head", None)
        tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
        if refresh_tied_head and tied and head is not None and hasattr(head, "quant_method"):
            head.quant_method.process_weights_after_loading(head)
        return "tied head re-packed" if refresh_tied_head and tied else "reloaded"
