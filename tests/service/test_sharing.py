"""Programs shared by shape: models whose backbones have the same shape and dtype run through the same
compiled executables, whatever their heads (2 or 7 labels, QA, NER, the masked-LM projection)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from service.engine import ProgramSet, backbone_signature
from service.metrics import COMPILES
from service.runtime import Runtime
from service.settings import Settings
from service.tasks.base import ModelInput
from tests.service.support import SMALL_GRID

# A backbone no other test module uses (one layer), so what is compiled here is this module's alone.
ONE_LAYER = dict(num_hidden_layers=1, num_hidden_groups=1, inner_group_num=1)
TASKS = {
    "two": ("sequence-classification", dict(seed=4, labels=["no", "yes"]), "classify"),
    "seven": ("sequence-classification", dict(seed=5, labels=list("abcdefg")), "classify"),
    "qa": ("question-answering", dict(seed=6), "qa"),
    "ner": ("token-classification", dict(seed=7), "ner"),
    "fill": ("masked-lm", dict(seed=8), "fill-mask"),
}


@pytest.fixture(scope="module")
def shared(make_repo, tmp_path_factory):
    repos = {name: make_repo(task, **ONE_LAYER, **kw) for name, (task, kw, _) in TASKS.items()}
    tmp = tmp_path_factory.mktemp("sharing")
    lines = []
    for name, (_, _, task) in TASKS.items():
        lines += [f"[models.{name}]", f'source = "{repos[name][0]}"', f'task = "{task}"', ""]
    (tmp / "models.toml").write_text("\n".join(lines))
    settings = Settings(
        **SMALL_GRID,
        models_file=str(tmp / "models.toml"),
        classify_model="",
        fill_mask_model="",
        qa_model="",
        ner_model="",
    )
    runtime = Runtime(settings)
    before = COMPILES.compilations
    runtime.start(background=False)
    compiled = COMPILES.compilations - before
    assert not runtime.failed, runtime.failed
    yield runtime, repos, compiled
    runtime.stop()


def test_models_of_one_backbone_share_one_program_whatever_their_heads(shared):
    runtime, _, _ = shared
    r = runtime.runners
    assert r["two"].config.num_labels == 2 and r["seven"].config.num_labels == 7
    # Classifiers of 2 and 7 labels: one program set; QA, NER and fill-mask: one other.
    assert isinstance(r["two"].main, ProgramSet)
    assert r["two"].main is r["seven"].main
    assert r["qa"].main is r["ner"].main is r["fill"].main
    assert r["two"].main is not r["qa"].main
    # The very same executables, bucket by bucket.
    grid = r["two"].buckets
    assert grid == r["seven"].buckets and r["two"].grid_complete
    for bucket in grid:
        assert r["two"]._compiled[bucket] is r["seven"]._compiled[bucket]
        assert r["qa"]._compiled[bucket] is r["ner"]._compiled[bucket] is r["fill"]._compiled[bucket]
    # Start-up compiled two grids and the vocabulary projections, not five grids.
    vocab = len(r["fill"]._mask_sizes)
    sets = {id(s): s for name in r for s in (r[name].main, r[name].vocab) if s is not None}
    assert len(sets) == 3
    assert sum(s.compiles for s in sets.values()) == 2 * len(grid) + vocab
    executables = {id(e) for name in r for e in r[name].main.compiled.values()}
    assert len(executables) == 2 * len(grid)
    # Each model reports the shared programs as its own progress.
    for name in r:
        served = runtime.models[name]
        assert served.compiled == served.total == served.grid.program_count()
        assert served.describe()["grid"]["complete"]


def test_the_sharing_key_leaves_out_the_labels_only(shared):
    runtime, _, _ = shared
    two, seven = runtime.runners["two"].config, runtime.runners["seven"].config
    assert backbone_signature(two) == backbone_signature(seven)
    assert "id2label" not in dict(backbone_signature(two))
    assert "hidden_size" in dict(backbone_signature(two))


def test_a_different_dtype_or_shape_gets_programs_of_its_own(shared, make_repo, tmp_path):
    runtime, repos, _ = shared
    settings = Settings(
        **SMALL_GRID,
        models=f"half={repos['two'][0]},deeper={make_repo('sequence-classification', seed=4, labels=['no', 'yes'])[0]}",
        classify_model="",
        fill_mask_model="",
        qa_model="",
        ner_model="",
    )
    other = Runtime(Settings(**{**settings.model_dump(), "dtype": "bfloat16"}))
    try:
        other.start(background=False)
        assert not other.failed, other.failed
        half, deeper = other.runners["half"], other.runners["deeper"]
        assert half.main is not runtime.runners["two"].main  # bfloat16
        assert half.main is not deeper.main  # one layer against two
    finally:
        other.stop()


def test_weights_are_held_once(shared):
    runtime, _, _ = shared
    for name, runner in runtime.runners.items():
        tree = runner.model.params
        # The program's parameters are the model's own placed arrays, not a copy.
        assert runner.params is tree["albert"], name
        leaves = jax.tree_util.tree_leaves(tree)
        assert all(hasattr(x, "sharding") for x in leaves), name  # on the devices; no host copy kept


def _inputs(runner, lengths):
    rng = np.random.default_rng(0)
    seqs = []
    for n in lengths:
        ids = rng.integers(5, runner.config.vocab_size, n).astype(np.int32)
        ids[0], ids[-1] = 2, 3
        seqs.append(ModelInput(ids, np.zeros(n, np.int32)))
    return seqs


@pytest.mark.parametrize("name", ["two", "seven", "qa", "ner"])
def test_shared_programs_with_host_heads_match_transformers(shared, name):
    runtime, repos, _ = shared
    runner = runtime.runners[name]
    model = repos[name][1]
    sequences = _inputs(runner, [5, 9, 17, 30])
    outputs, _ = runner.run(sequences)
    for seq, out in zip(sequences, outputs, strict=True):
        with torch.no_grad():
            ref = model(input_ids=torch.tensor(seq.input_ids[None], dtype=torch.long))
        if name == "qa":
            np.testing.assert_allclose(out["start_logits"], ref.start_logits[0].numpy(), atol=1e-4)
            np.testing.assert_allclose(out["end_logits"], ref.end_logits[0].numpy(), atol=1e-4)
        elif name == "ner":
            np.testing.assert_allclose(out["logits"], ref.logits[0].numpy(), atol=1e-4)
        else:
            assert out["logits"].shape == (runner.config.num_labels,)
            np.testing.assert_allclose(out["logits"], ref.logits[0].numpy(), atol=1e-4)


def test_fill_mask_through_the_shared_program(shared):
    runtime, repos, _ = shared
    runner = runtime.runners["fill"]
    model = repos["fill"][1]
    sequences = _inputs(runner, [7, 12])
    for seq in sequences:
        seq.mask_positions = np.array([1, 3], np.int32)
    outputs, _ = runner.run(sequences)
    for seq, out in zip(sequences, outputs, strict=True):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor(seq.input_ids[None], dtype=torch.long)).logits[0]
        probs = torch.softmax(logits[seq.mask_positions], -1).numpy()
        np.testing.assert_allclose(out["probs"], probs, atol=1e-5)


def test_models_with_the_same_tokenizer_files_share_one_tokenizer(shared):
    runtime, _, _ = shared
    tokenizers = {name: runtime.tasks[name].tokenizer for name in TASKS}
    # make_repo writes one tokenizer for every repository: one object serves all five models.
    assert len({id(t) for t in tokenizers.values()}) == 1
    ids = tokenizers["two"].encode("the city by the river")[0].ids
    assert ids[0] == 2 and ids[-1] == 3
