"""Run transformers' PyTorch model on our ModelInputs, one at a time and unpadded.

Used by the task tests to check pre- and post-processing against the pipelines independently of the
JAX engine (the engine has its own parity tests).
"""

from __future__ import annotations

import numpy as np
import torch

from service.tasks.base import ModelInput


def torch_outputs(model, model_inputs: list[ModelInput], task: str) -> list[dict[str, np.ndarray]]:
    results = []
    with torch.no_grad():
        for mi in model_inputs:
            ids = torch.tensor(mi.input_ids[None, :], dtype=torch.long)
            types = torch.tensor(mi.token_type_ids[None, :], dtype=torch.long)
            out = model(input_ids=ids, token_type_ids=types, attention_mask=torch.ones_like(ids))
            if task == "classify" or task == "ner":
                results.append({"logits": out.logits[0].float().numpy()})
            elif task == "qa":
                results.append(
                    {
                        "start_logits": out.start_logits[0].float().numpy(),
                        "end_logits": out.end_logits[0].float().numpy(),
                    }
                )
            elif task == "fill-mask":
                logits = out.logits[0, torch.as_tensor(mi.mask_positions, dtype=torch.long)].float()
                results.append({"probs": torch.softmax(logits, dim=-1).numpy()})
            else:
                raise ValueError(task)
    return results
