"""Fill-mask projects mask positions onto the vocabulary in chunks of at most MAX_MASK_CHUNK masks: a batch
holding more masks than that runs several projections. Their answers are the pipeline's."""

from __future__ import annotations

import warnings

from compare import assert_matches_pipeline

from service.engine import MAX_MASK_CHUNK
from service.tasks.fill_mask import FillMaskParams

WORDS = "the of in and a to the in of the".split()  # one piece each


def _texts() -> list[str]:
    # Four texts of 70 masks each among short words (about 142 tokens, under the model's 160): 280 masks.
    texts = []
    for shift in range(4):
        words = [WORDS[(i + shift) % len(WORDS)] if i % 2 else "[MASK]" for i in range(140)]
        texts.append(" ".join(words))
    return texts


def test_more_masks_than_one_chunk_in_one_batch_match_the_pipeline(runtime, pipelines):
    texts = _texts()
    task, runner = runtime.tasks["fill-mask"], runtime.runners["fill-mask"]
    params = FillMaskParams(top_k=3)
    prepared = task.prepare(texts, params)
    masks = sum(len(s.mask_positions) for s in prepared.model_inputs)
    assert masks > MAX_MASK_CHUNK, masks
    # All of them in one forward pass (the cheapest bucket that holds them): the projection is chunked.
    outputs, batch = runner.run(prepared.model_inputs)
    assert len(batch.placements) == len(texts)
    assert [len(o["probs"]) for o in outputs] == [len(s.mask_positions) for s in prepared.model_inputs]
    answers = task.finish(prepared, outputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = [pipelines["fill-mask"](text, top_k=3) for text in texts]
    assert_matches_pipeline(answers, expected)


def test_a_request_with_more_masks_than_one_chunk_matches_the_pipeline(client, pipelines):
    texts = _texts()
    response = client.post("/fill-mask", json={"inputs": texts, "parameters": {"top_k": 2}})
    assert response.status_code == 200, response.text
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = [pipelines["fill-mask"](text, top_k=2) for text in texts]
    assert_matches_pipeline(response.json(), expected)
