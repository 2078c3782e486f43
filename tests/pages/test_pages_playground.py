"""The playground at `/`, in headless Chromium against a real `albert-serve`: one test per task, each filling
the form as a person would and checking what is drawn against the API's own answer to the same request.
"""

from __future__ import annotations

import math

import httpx
import pytest
from selenium.webdriver.common.by import By

from tests.pages.browser import (
    NetworkLog,
    bars,
    emulate_phone,
    listed_models,
    model_for,
    open_playground,
    run,
    screenshot,
    shown_error,
    text_of,
    type_into,
    wait,
)


@pytest.fixture(scope="module")
def catalog(server):
    """(models, legacy) as the server lists them."""
    return listed_models(server.url)


@pytest.fixture(scope="module")
def more_catalog(more_server):
    return listed_models(more_server.url)


def served(catalog, task: str) -> dict:
    models = [m for m in catalog[0] if m["task"] == task]
    if not models:
        pytest.skip("task not served by this build")
    model = model_for(models, task)
    if model is None:
        pytest.fail(f"no {task} model is ready: {[(m['name'], m['state'], m.get('reason')) for m in models]}")
    return model


def api(server, catalog, model: dict, body: dict) -> httpx.Response:
    """The API's answer to the request the page makes (with "model" when the build has named models)."""
    request = body if catalog[1] else {**body, "model": model["name"]}
    return httpx.post(server.url + model["endpoint"], json=request, timeout=60)


def assert_stayed_local(driver, url: str) -> None:
    outside = NetworkLog(driver).outside(url)
    assert outside == [], f"the page loaded from outside the service: {outside}"


def test_model_list_shows_every_model_and_disables_those_not_ready(server, browser, catalog, tmp_path):
    models, _ = catalog
    browser.get(server.url + "/playground")
    wait(browser).until(lambda d: d.find_element(By.ID, "model").is_enabled())
    options = browser.find_elements(By.CSS_SELECTOR, "#model option")
    assert [o.get_attribute("value") for o in options] == [m["name"] for m in models_by_task(models)]
    for option, model in zip(options, models_by_task(models), strict=True):
        assert (option.get_attribute("disabled") is not None) == (model["state"] != "ready"), model
        if model["state"] != "ready":
            assert model["state"] in option.text
    screenshot(browser, tmp_path / "models.png")
    assert_stayed_local(browser, server.url)


def models_by_task(models: list[dict]) -> list[dict]:
    """The listing in the order the page groups it: by task, in order of first appearance."""
    tasks = list(dict.fromkeys(m["task"] for m in models))
    return [m for task in tasks for m in models if m["task"] == task]


def test_classify_draws_one_bar_per_label(server, browser, catalog, tmp_path):
    model = served(catalog, "classify")
    text = "Marie Curie worked in Paris and loved the city."
    open_playground(browser, server.url, model)
    type_into(browser, "classify-text", text)
    type_into(browser, "classify-pair", "")
    run(browser)
    expected = api(server, catalog, model, {"inputs": text})
    assert expected.status_code == 200, expected.text
    answer = expected.json()
    assert shown_error(browser) is None
    assert len(answer) >= 2
    assert bars(browser) == [(a["label"], f"{a['score']:.4f}") for a in answer]
    info = httpx.get(server.url + "/info").json()["endpoints"].get(model["name"])
    if info and info.get("labels"):  # all labels, as the pipeline's top_k=None
        assert len(bars(browser)) == len(info["labels"])
    screenshot(browser, tmp_path / "classify.png")
    assert_stayed_local(browser, server.url)


def test_fill_mask_shows_top_k_candidates_in_place(server, browser, catalog, tmp_path):
    model = served(catalog, "fill-mask")
    mask = model.get("mask_token", "[MASK]")
    open_playground(browser, server.url, model)
    assert text_of(browser.find_element(By.CSS_SELECTOR, "#fs-fill-mask .mask-token")) == mask
    for masks, text in [(1, f"Paris is the {mask} of France."), (2, f"The {mask} sat on the {mask} today.")]:
        type_into(browser, "fm-text", text)
        type_into(browser, "fm-topk", "3")
        run(browser)
        answer = api(server, catalog, model, {"inputs": text, "parameters": {"top_k": 3}}).json()
        per_mask = answer if masks > 1 else [answer]
        assert shown_error(browser) is None
        slots = browser.find_elements(By.CSS_SELECTOR, "#output .mask-sentence .mask-slot")
        assert len(slots) == masks
        for slot, candidates in zip(slots, per_mask, strict=True):
            shown = [text_of(c) for c in slot.find_elements(By.CLASS_NAME, "cand-token")]
            assert shown == [c["token_str"] for c in candidates] and len(shown) == 3
        # The candidates stand where the masks were: the sentence reads around them.
        sentence = browser.find_element(By.CSS_SELECTOR, "#output .mask-sentence")
        outside_slots = browser.execute_script(
            "const s = arguments[0].cloneNode(true); s.querySelectorAll('.mask-slot').forEach(x => x.remove());"
            "return s.textContent;",
            sentence,
        )
        assert outside_slots == text.replace(mask, "")
        screenshot(browser, tmp_path / f"fill-mask-{masks}.png")
    assert_stayed_local(browser, server.url)


def test_qa_marks_the_answer_in_the_context(server, browser, catalog, tmp_path):
    model = served(catalog, "qa")
    # A character outside the BMP before the answer: the API's offsets count code points, JavaScript's UTF-16.
    question, context = "Where did she work?", "Marie Curie 🧪 worked in Paris, at the Radium Institute."
    open_playground(browser, server.url, model)
    type_into(browser, "qa-question", question)
    type_into(browser, "qa-context", context)
    run(browser)
    answer = api(server, catalog, model, {"inputs": {"question": question, "context": context}}).json()
    assert shown_error(browser) is None
    assert answer["answer"] and answer["answer"] == context[answer["start"] : answer["end"]]
    marked = browser.find_elements(By.CSS_SELECTOR, "#output mark.answer")
    assert [text_of(m) for m in marked] == [answer["answer"]]
    assert text_of(browser.find_element(By.CSS_SELECTOR, "#output .passage")) == context
    assert text_of(browser.find_element(By.CSS_SELECTOR, "#output .answer-text")) == answer["answer"]
    screenshot(browser, tmp_path / "qa.png")
    assert_stayed_local(browser, server.url)


def test_ner_highlights_each_entity_with_its_label(server, browser, catalog, tmp_path):
    model = served(catalog, "ner")
    text = "Marie Curie 🧪 worked in Paris with Pierre Curie at the Sorbonne."
    open_playground(browser, server.url, model)
    type_into(browser, "ner-text", text)
    run(browser)
    entities = api(server, catalog, model, {"inputs": text}).json()
    assert shown_error(browser) is None
    assert entities, "the tiny model found no entity in this text: the test would check nothing"
    marks = browser.find_elements(By.CSS_SELECTOR, "#output .passage mark.entity")
    shown = [
        (
            text_of(m.find_element(By.CLASS_NAME, "entity-text")),
            text_of(m.find_element(By.CLASS_NAME, "entity-label")),
        )
        for m in marks
    ]
    # Spans are marked in order of their start; one that overlaps the previous mark is listed, not marked
    # (the tiny model's random weights give such spans; a trained one rarely does).
    expected, end = [], 0
    for entity in sorted(entities, key=lambda e: e["start"]):
        if entity["start"] >= end:
            expected.append((text[entity["start"] : entity["end"]], entity["entity_group"]))
            end = entity["end"]
    assert shown == expected and shown
    rows = browser.find_elements(By.CSS_SELECTOR, "#output table.entities tbody tr")
    assert len(rows) == len(entities)
    # The highlighted passage is the text itself, labels aside.
    passage = browser.find_element(By.CSS_SELECTOR, "#output .passage")
    plain = browser.execute_script(
        "const p = arguments[0].cloneNode(true); p.querySelectorAll('.entity-label').forEach(x => x.remove());"
        "return p.textContent;",
        passage,
    )
    assert plain == text
    screenshot(browser, tmp_path / "ner.png")
    assert_stayed_local(browser, server.url)


def test_embed_draws_the_cosine_matrix(more_server, browser, more_catalog, tmp_path):
    model = served(more_catalog, "embed")
    sentences = ["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell today."]
    open_playground(browser, more_server.url, model)
    type_into(browser, "embed-texts", "\n".join(sentences))
    run(browser)
    vectors = api(more_server, more_catalog, model, {"inputs": sentences}).json()
    assert shown_error(browser) is None
    cells = browser.find_elements(By.CSS_SELECTOR, "#output table.cosine td.sim")
    assert len(cells) == len(sentences) ** 2
    for cell in cells:
        i, j = int(cell.get_attribute("data-row")), int(cell.get_attribute("data-col"))
        a, b = vectors[i], vectors[j]
        expected = sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(
            sum(x * x for x in a) * sum(y * y for y in b)
        )
        assert float(cell.get_attribute("data-value")) == pytest.approx(expected, abs=1e-6)
        assert text_of(cell) == f"{expected:.3f}"
    screenshot(browser, tmp_path / "embed.png")
    assert_stayed_local(browser, more_server.url)


def test_zero_shot_draws_one_bar_per_candidate_label(more_server, browser, more_catalog, tmp_path):
    model = served(more_catalog, "zero-shot")
    text, labels = "The match went to penalties after extra time.", ["sports", "politics", "cooking"]
    open_playground(browser, more_server.url, model)
    type_into(browser, "zs-text", text)
    type_into(browser, "zs-labels", ", ".join(labels))
    run(browser)
    answer = api(
        more_server,
        more_catalog,
        model,
        {"inputs": text, "parameters": {"candidate_labels": labels, "multi_label": False}},
    ).json()
    assert shown_error(browser) is None
    assert bars(browser) == [
        (label, f"{s:.4f}") for label, s in zip(answer["labels"], answer["scores"], strict=True)
    ]
    assert len(bars(browser)) == len(labels)
    screenshot(browser, tmp_path / "zero-shot.png")
    assert_stayed_local(browser, more_server.url)


def test_rerank_draws_one_bar_per_text_best_first(more_server, browser, more_catalog, tmp_path):
    model = served(more_catalog, "rerank")
    query = "What is the capital of France?"
    texts = [
        "Berlin is the capital of Germany.",
        "Paris is the capital of France.",
        "Cheese is made from milk.",
    ]
    open_playground(browser, more_server.url, model)
    type_into(browser, "rr-query", query)
    type_into(browser, "rr-texts", "\n".join(texts))
    run(browser)
    ranked = api(more_server, more_catalog, model, {"query": query, "texts": texts}).json()
    assert shown_error(browser) is None
    assert bars(browser) == [(f"#{r['index'] + 1} {texts[r['index']]}", f"{r['score']:.4f}") for r in ranked]
    screenshot(browser, tmp_path / "rerank.png")
    assert_stayed_local(browser, more_server.url)


def test_sparse_embed_draws_the_largest_terms_with_their_tokens(more_server, browser, more_catalog, tmp_path):
    model = served(more_catalog, "sparse-embed")
    text = "What is Deep Learning?"
    open_playground(browser, more_server.url, model)
    type_into(browser, "sparse-text", text)
    run(browser)
    assert shown_error(browser) is None
    terms = api(more_server, more_catalog, model, {"inputs": text}).json()[0]
    top = sorted(terms, key=lambda t: -t["value"])[:20]
    wait(browser).until(
        lambda d: d.find_element(By.CSS_SELECTOR, "#output .bars").get_attribute("data-decoded")
    )
    tokens = httpx.post(
        more_server.url + "/decode",
        json={"ids": [[t["index"]] for t in top], "skip_special_tokens": False, "model": model["name"]},
        timeout=60,
    ).json()
    assert bars(browser) == [
        (f"{token} (#{t['index']})", f"{t['value']:.4f}") for token, t in zip(tokens, top, strict=True)
    ]
    screenshot(browser, tmp_path / "sparse.png")
    assert_stayed_local(browser, more_server.url)


def test_error_message_is_shown_as_the_api_gives_it(server, browser, catalog, tmp_path):
    model = served(catalog, "classify")
    open_playground(browser, server.url, model)
    type_into(browser, "classify-text", "")
    type_into(browser, "classify-pair", "")
    run(browser)
    expected = api(server, catalog, model, {"inputs": ""})
    assert expected.status_code == 422
    assert shown_error(browser) == expected.json()["error"]
    meta = text_of(browser.find_element(By.CSS_SELECTOR, "#error .error-meta"))
    assert meta == f"422 {expected.json()['error_type']}"
    assert browser.find_elements(By.CSS_SELECTOR, "#output > *") == []
    screenshot(browser, tmp_path / "error-422.png")
    # The next good request clears the error.
    type_into(browser, "classify-text", "Fine again.")
    run(browser)
    assert shown_error(browser) is None and bars(browser)


def test_phone_width_has_no_horizontal_overflow(server, browser, catalog, tmp_path):
    emulate_phone(browser)
    long_word = "Pneumonoultramicroscopicsilicovolcanoconiosis" * 3
    inputs = {
        "classify": [("classify-text", f"A very long word: {long_word}, and some more text.")],
        "ner": [("ner-text", f"Marie Curie worked in Paris near {long_word}.")],
        "qa": [("qa-question", "Where?"), ("qa-context", f"Marie Curie worked in Paris, {long_word}.")],
    }
    tried = []
    for model in models_by_task(catalog[0]):
        if model["state"] != "ready" or model["task"] in tried:
            continue
        open_playground(browser, server.url, model)
        assert browser.execute_script("return window.innerWidth") == 390
        for element_id, text in inputs.get(model["task"], []):
            type_into(browser, element_id, text)
        run(browser)
        assert shown_error(browser) is None, shown_error(browser)
        width, inner = browser.execute_script(
            "return [document.documentElement.scrollWidth, window.innerWidth]"
        )
        assert width <= inner, f"{model['task']}: the page is {width}px wide in a {inner}px viewport"
        screenshot(browser, tmp_path / f"phone-{model['task']}.png")
        tried.append(model["task"])
    assert {"classify", "fill-mask", "qa", "ner"} & set(tried)
    assert_stayed_local(browser, server.url)
