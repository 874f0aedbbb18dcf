"""CUDA-graph decoding: one model step (embedding, every layer's fused step kernels, the final
norm and lm_head) captured once per batch size and replayed, so that a decode step costs one
graph launch instead of hundreds of kernel launches.

The graph works on its own static buffers: a cache, the input token and the output logits.
`load` copies a cache's state in (a few MB), `store` copies it back out, so one captured
graph serves every generation of that batch size. The graph reads the parameters' storage on
every replay and holds nothing derived from them (A = -exp(A_log) is computed inside it), so
training between generations needs no new capture; one is made when a parameter has been
replaced by a new tensor (`model.to(...)`, assigning a new Parameter)."""

from __future__ import annotations

import torch


class GraphedDecoder:
    def __init__(self, model, batch_size: int, device: torch.device, warmup: int = 2, like=None):
        self.model = model
        self.cache = model.allocate_cache(batch_size, device=device)
        if like is not None:  # a hybrid's KV caches: as many slots as the caches it will load
            for mine, theirs in zip(self.cache.layers, like.layers):
                if hasattr(mine, "reserve"):
                    mine.reserve(theirs.capacity)
        self.token = torch.zeros(batch_size, dtype=torch.long, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(warmup):  # compiles the Triton kernels and fills the memoised A
                self._step()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.logits = self._step()  # (B, V), overwritten by each replay

    def _step(self) -> torch.Tensor:
        return self.model.lm_head(self.model.backbone.step(self.token, self.cache))

    def load(self, cache) -> None:
        self.cache.copy_from_(cache)

    def store(self, cache) -> None:
        cache.copy_from_(self.cache)

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        self.token.copy_(token)
        self.graph.replay()
        return self.logits


def graphed_decoder(model, batch_size: int, device: torch.device, cache=None) -> GraphedDecoder:
    """The model's captured decoder for this batch size (and, for a hybrid, the KV caches'
    slots of `cache`, the cache it will load), captured on first use."""
    graphs = model.__dict__.setdefault("_cuda_graphs", {})
    storage = tuple(p.data_ptr() for p in model.parameters())  # what the graph reads
    slots = () if cache is None else tuple(getattr(s, "capacity", 0) for s in cache.layers)
    key = (batch_size, str(device), slots)
    entry = graphs.get(key)
    if entry is None or entry[0] != storage:
        graphs[key] = (storage, GraphedDecoder(model, batch_size, device, like=cache))
    return graphs[key][1]
