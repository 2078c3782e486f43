"""Token embeddings (TEI's `POST /embed_all`): the backbone's last hidden state at every token, as
sentence-transformers' `encode(..., output_value="token_embeddings")` returns it (the Transformer module's
output, before Pooling).

An embedding model's compiled grid pools inside the program, so its executables never hand back per-token
states. This runs the backbone alone on the same packed layout (the model's Packer and compiled bucket
shapes), jitted once per bucket shape on first use, on the caller's thread: /embed_all is a
debugging and late-interaction route, not the service's hot path, and it does not queue behind /embed.
"""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np

from ..base import ModelInput


class TokenEmbeddings:
    """`run(sequences)` -> each sequence's [n, H] float32 last hidden state, for one embedding model's runner."""

    def __init__(self, runner):
        self.runner = runner
        module = runner.model.module

        def fn(params, input_ids, token_type_ids, position_ids, segment_ids):
            def backbone(m):
                return m.albert(input_ids, None, token_type_ids, position_ids, segment_ids)  # [R, L, H]

            return module.apply({"params": params}, method=backbone).astype(jnp.float32)

        self._fn = jax.jit(fn)

    def run(self, sequences: list[ModelInput]) -> list[np.ndarray]:
        packer = self.runner.packer
        params = self.runner.params["model"]
        states: list[np.ndarray | None] = [None] * len(sequences)

        def place(indices: list[int]) -> None:
            chunk = [sequences[i] for i in indices]
            plan = packer.plan_all([len(s) for s in chunk])
            if plan is None:  # more tokens than the largest bucket: halve (a lone sequence always fits)
                half = len(indices) // 2
                place(indices[:half])
                place(indices[half:])
                return
            batch = packer.pack(chunk, plan)
            hidden = np.asarray(
                self._fn(params, batch.input_ids, batch.token_type_ids, batch.position_ids, batch.segment_ids)
            )
            for index, (r, offset, n) in zip(indices, batch.placements, strict=True):
                states[index] = hidden[r, offset : offset + n]

        place(list(range(len(sequences))))
        return states  # type: ignore[return-value]


_CACHE: dict[int, TokenEmbeddings] = {}
_CACHE_LOCK = threading.Lock()


def token_embeddings_for(runner) -> TokenEmbeddings:
    """One TokenEmbeddings per runner (its jitted shapes are kept with it)."""
    with _CACHE_LOCK:
        found = _CACHE.get(id(runner))
        if found is None or found.runner is not runner:
            found = _CACHE[id(runner)] = TokenEmbeddings(runner)
        return found
