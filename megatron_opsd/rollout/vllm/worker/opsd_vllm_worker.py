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

Importing the module also registers the weight-transfer backend ``opsd_gloo``
(``--weight-transfer-config '{"backend": "opsd_gloo"}'``): vLLM's dense NCCL backend with its
transport, a NCCL communicator, replaced by a gloo group, because vLLM's built-in backends are all
GPU transports. Everything else is vLLM's: the HTTP routes, the init info and its ranks, the
per-update metadata, the layerwise reload around the received tensors. It lets CPU servers take
``rollout.sync.kind: distributed`` (tests, CPU runs); GPUs use ``nccl`` itself.
"""
from __future__ import annotations

import datetime
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GLOO_BACKEND = "opsd_gloo"


def hf_tensors(path: str) -> Iterator[tuple[str, object]]:
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    for file in files:
        with safe_open(str(file), framework="pt") as shard:
            for name in shard.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, shard.get_tensor(name)


def repack_tied_head(model: Any) -> bool:
    """Re-pack the output layer of a tied-embedding model (vLLM's CPU reload leaves it stale); whether it was."""
    head = getattr(model, "lm_head", None)
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    if tied and head is not None and hasattr(head, "quant_method"):
        head.quant_method.process_weights_after_loading(head)
        return True
    return False


class WeightReload:
    """Mixed into vLLM's worker class: ``self`` is the worker."""

    def opsd_reload(self, path: str, refresh_tied_head: bool = True) -> str:
        self.model_runner.reload_weights(weights_iterator=hf_tensors(path))
        if refresh_tied_head and repack_tied_head(self.model_runner.get_model()):
            return "tied head re-packed"
        return "reloaded"


def _register_gloo_backend() -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed import TCPStore
    from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine, NCCLWeightTransferInitInfo
    from vllm.model_executor.model_loader.mtp_validation import disable_mtp_completeness_check

    @dataclass(kw_only=True)
    class GlooInitInfo(NCCLWeightTransferInitInfo):
        """NCCL's init info (rendezvous at ``master_address:master_port``, ``rank_offset``,
        ``world_size``) and the name of the group in the trainer's store."""

        group_name: str
        timeout_s: float = 600.0

    class GlooWeightTransferEngine(NCCLWeightTransferEngine):
        """Rank ``rank_offset + dp_rank * world + rank`` of a gloo group whose rank 0 (the trainer)
        hosts its store, built as the trainer builds it (a ``PrefixStore`` named after the group);
        tensors broadcast one at a time (unpacked), each loaded as it arrives."""

        init_info_cls = GlooInitInfo

        def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
            if init_info.packed:
                raise ValueError(f"{GLOO_BACKEND} broadcasts tensors one at a time: packed must be false")
            parallel = self.parallel_config
            rank = init_info.rank_offset + parallel.data_parallel_index * parallel.world_size + parallel.rank
            timeout = datetime.timedelta(seconds=init_info.timeout_s)
            store = TCPStore(init_info.master_address, init_info.master_port, init_info.world_size, is_master=False,
                             timeout=timeout)
            group, _ = _new_process_group_helper(
                init_info.world_size, rank, [], Backend("gloo"), PrefixStore(init_info.group_name, store),
                group_name=init_info.group_name, timeout=timeout)
            _world.pg_group_ranks[group] = {i: i for i in range(init_info.world_size)}
            self.model_update_group = group

        def update_weights(self, update_info: dict[str, Any]) -> None:
            self.receive_weights(self.parse_update_info(update_info))  # gloo is synchronous: no device to wait for

        def receive_weights(self, update_info) -> None:
            if self.model_update_group is None:
                raise RuntimeError("weight transfer not initialized: call /init_weight_transfer_engine first")
            with disable_mtp_completeness_check():
                for name, dtype_name, shape in zip(update_info.names, update_info.dtype_names, update_info.shapes):
                    weight = torch.empty(shape, dtype=getattr(torch, dtype_name), device=self.device)
                    dist.broadcast(weight, group_src=0, group=self.model_update_group)
                    self.model.load_weights([(name, weight)])

        def finish_weight_update(self) -> None:
            super().finish_weight_update()
            repack_tied_head(self.model)

        def shutdown(self) -> None:
            if self.model_update_group is not None:
                dist.destroy_process_group(self.model_update_group)
                self.model_update_group = None

    WeightTransferEngineFactory.register_engine(GLOO_BACKEND, GlooWeightTransferEngine)


try:
    import vllm  # noqa: F401 - the backend is vLLM's; outside a vLLM environment there is nothing to register
except ImportError:
    pass
else:
    _register_gloo_backend()
