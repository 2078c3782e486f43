// albert-serve playground: plain JavaScript, no framework, nothing loaded from outside the service.
//
// It lists the models (GET /models), shows the form of the chosen model's task, sends the request to the
// task's endpoint with "model": <name>, and draws the answer. Every text from the user or the API is put into
// the page with textContent, never as HTML.
'use strict';

(function () {
  const KEY_STORAGE = 'albert-serve.api-key';
  const POLL_MS = 2000;

  const $ = (id) => document.getElementById(id);
  const el = (tag, props, ...children) => {
    const node = document.createElement(tag);
    Object.assign(node, props || {});
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  };

  const state = {
    models: [],
    current: null, // the selected model's listing entry
    legacy: false, // a build without GET /models: one model per endpoint, listed from GET /info
    retry: null, // the action a 401 interrupted; run again once a key is given
    poll: null,
  };

  // --- API key ---------------------------------------------------------------------------------------------

  function apiKey() {
    return sessionStorage.getItem(KEY_STORAGE) || localStorage.getItem(KEY_STORAGE) || '';
  }

  function storeKey(key, remember) {
    sessionStorage.removeItem(KEY_STORAGE);
    localStorage.removeItem(KEY_STORAGE);
    if (key) (remember ? localStorage : sessionStorage).setItem(KEY_STORAGE, key);
    showKeyState();
  }

  function showKeyState() {
    const key = apiKey();
    $('key-state').textContent = key ? 'set' + (localStorage.getItem(KEY_STORAGE) ? ' (remembered)' : '') : 'none';
    $('api-key').value = key;
    $('remember-key').checked = Boolean(localStorage.getItem(KEY_STORAGE));
  }

  function askForKey(message, retry) {
    const panel = $('key-panel');
    panel.open = true;
    panel.classList.add('attention');
    $('key-message').textContent = message + ' Type the API key and press "Use key".';
    state.retry = retry || null;
    $('api-key').focus();
  }

  // --- HTTP ------------------------------------------------------------------------------------------------

  function url(path) {
    // Relative to the page, so that the playground also works behind a path prefix.
    return new URL(path.replace(/^\//, ''), document.baseURI).toString();
  }

  async function call(method, path, body) {
    const headers = {};
    const key = apiKey();
    if (key) headers.Authorization = 'Bearer ' + key;
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    const started = performance.now();
    const response = await fetch(url(path), {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: 'no-store',
    });
    const text = await response.text();
    let json = null;
    try {
      json = text ? JSON.parse(text) : null;
    } catch (_) {
      json = null;
    }
    return { status: response.status, ok: response.ok, json, text, ms: performance.now() - started };
  }

  function errorText(reply) {
    if (reply.json && typeof reply.json.error === 'string') return reply.json.error;
    return reply.text || 'HTTP ' + reply.status;
  }

  // --- models ----------------------------------------------------------------------------------------------

  async function loadModels() {
    clearTimeout(state.poll);
    let reply;
    try {
      reply = await call('GET', '/models');
      if (reply.status === 404) {
        // Builds before named models: one model per endpoint, named after it, listed by /info.
        const info = await call('GET', '/info');
        if (info.ok && info.json && info.json.endpoints) {
          state.legacy = true;
          reply = { ok: true, status: 200, json: { models: modelsFromInfo(info.json.endpoints) } };
        }
      }
    } catch (err) {
      modelListProblem('The service did not answer (' + err.message + ').');
      state.poll = setTimeout(loadModels, POLL_MS * 2);
      return;
    }
    if (reply.status === 401) {
      modelListProblem('The model list needs an API key.');
      askForKey('The service asks for an API key.', loadModels);
      return;
    }
    if (!reply.ok || !reply.json || !Array.isArray(reply.json.models)) {
      modelListProblem('GET /models answered ' + reply.status + ': ' + errorText(reply));
      return;
    }
    state.models = reply.json.models;
    fillModelSelect();
    if (state.models.some((m) => m.state !== 'ready' && m.state !== 'failed')) {
      state.poll = setTimeout(loadModels, POLL_MS);
    }
  }

  function modelsFromInfo(endpoints) {
    return Object.entries(endpoints).map(([name, entry]) => ({
      name,
      task: name,
      endpoint: '/' + name,
      source: entry.source,
      default: true,
      state: entry.state === 'warming up' ? 'compiling' : entry.state,
      reason: entry.error,
    }));
  }

  function modelListProblem(message) {
    const select = $('model');
    select.replaceChildren(el('option', { textContent: message }));
    select.disabled = true;
    $('model-info').textContent = message;
    $('run').disabled = true;
  }

  function fillModelSelect() {
    const select = $('model');
    const wanted = (state.current && state.current.name) || decodeURIComponent(location.hash.slice(1));
    const byTask = new Map();
    for (const model of state.models) {
      if (!byTask.has(model.task)) byTask.set(model.task, []);
      byTask.get(model.task).push(model);
    }
    const groups = [];
    for (const [task, models] of byTask) {
      const group = el('optgroup', { label: TASKS[task] ? TASKS[task].title : task });
      for (const model of models) {
        const usable = model.state === 'ready' && Boolean(TASKS[model.task]);
        const notes = [];
        if (model.default && !state.legacy) notes.push('default');
        if (model.state !== 'ready') notes.push(model.state);
        if (!TASKS[model.task]) notes.push('no form for this task');
        const option = el('option', {
          value: model.name,
          textContent: model.name + (notes.length ? ' (' + notes.join(', ') + ')' : ''),
          disabled: !usable,
        });
        option.dataset.task = model.task;
        option.dataset.state = model.state;
        group.append(option);
      }
      groups.push(group);
    }
    if (!groups.length) {
      modelListProblem('No model is configured on this service.');
      return;
    }
    select.replaceChildren(...groups);
    select.disabled = false;
    const pick =
      state.models.find((m) => m.name === wanted) ||
      state.models.find((m) => m.state === 'ready' && m.default && TASKS[m.task]) ||
      state.models.find((m) => m.state === 'ready' && TASKS[m.task]) ||
      state.models[0];
    select.value = pick.name;
    selectModel(pick.name);
  }

  function selectModel(name) {
    const model = state.models.find((m) => m.name === name);
    const changedTask = !state.current || !model || state.current.task !== model.task;
    state.current = model || null;
    if (!model) return;
    if (location.hash.slice(1) !== encodeURIComponent(name)) {
      history.replaceState(null, '', '#' + encodeURIComponent(name));
    }
    const info = $('model-info');
    info.replaceChildren(
      'Task ',
      el('strong', { textContent: model.task }),
      ' at ',
      el('code', { textContent: 'POST ' + model.endpoint }),
      model.source ? ' · source ' : '',
      model.source ? el('code', { textContent: model.source }) : '',
      ' · ',
      el('span', { className: 'state state-' + model.state, textContent: model.state }),
      model.reason ? ': ' + model.reason : ''
    );
    for (const fieldset of document.querySelectorAll('fieldset[data-task]')) {
      fieldset.hidden = fieldset.dataset.task !== model.task;
    }
    const task = TASKS[model.task];
    $('no-form').hidden = Boolean(task);
    $('no-form').textContent = task ? '' : 'This page has no form for the task "' + model.task + '".';
    $('run').disabled = !task || model.state !== 'ready';
    if (model.task === 'fill-mask') useMaskToken(model.mask_token || '[MASK]');
    if (changedTask) $('result').hidden = true;
  }

  function useMaskToken(token) {
    const previous = $('fs-fill-mask').dataset.mask || '[MASK]';
    if (previous !== token) {
      $('fm-text').value = $('fm-text').value.split(previous).join(token);
    }
    $('fs-fill-mask').dataset.mask = token;
    for (const node of document.querySelectorAll('.mask-token')) node.textContent = token;
  }

  // --- tasks: the request each form makes, and how its answer is drawn --------------------------------------

  const lines = (text) =>
    text
      .split('\n')
      .map((line) => line.trim())
      .filter((line) => line.length);

  const TASKS = {
    classify: {
      title: 'Text classification',
      body() {
        const text = $('classify-text').value;
        const pair = $('classify-pair').value;
        return { inputs: pair.trim() ? { text, text_pair: pair } : text };
      },
      render(answer) {
        return bars(answer.map((a) => [a.label, a.score]));
      },
    },
    'zero-shot': {
      title: 'Zero-shot classification',
      body() {
        const labels = $('zs-labels')
          .value.split(',')
          .map((label) => label.trim())
          .filter((label) => label.length);
        return {
          inputs: $('zs-text').value,
          parameters: { candidate_labels: labels, multi_label: $('zs-multi').checked },
        };
      },
      render(answer) {
        return bars(answer.labels.map((label, i) => [label, answer.scores[i]]));
      },
    },
    'fill-mask': {
      title: 'Fill mask',
      body() {
        const topK = parseInt($('fm-topk').value, 10);
        return { inputs: $('fm-text').value, parameters: Number.isFinite(topK) ? { top_k: topK } : {} };
      },
      render(answer, request) {
        return fillMask(request.inputs, answer);
      },
    },
    qa: {
      title: 'Question answering',
      body() {
        return { inputs: { question: $('qa-question').value, context: $('qa-context').value } };
      },
      render(answer, request) {
        return qaAnswer(request.inputs.context, Array.isArray(answer) ? answer[0] : answer);
      },
    },
    ner: {
      title: 'Named entities',
      body() {
        return { inputs: $('ner-text').value };
      },
      render(answer, request) {
        return entities(request.inputs, answer);
      },
    },
    embed: {
      title: 'Embeddings',
      body() {
        return { inputs: lines($('embed-texts').value) };
      },
      render(answer, request) {
        return cosineMatrix(request.inputs, answer);
      },
    },
    'sparse-embed': {
      title: 'Sparse embeddings (SPLADE)',
      body() {
        return { inputs: $('sparse-text').value };
      },
      render(answer, request) {
        // The 20 largest terms as bars, labelled by id at once, then by their token's text from POST /decode.
        const top = answer[0].slice().sort((a, b) => b.value - a.value).slice(0, 20);
        const box = bars(top.map((t) => ['#' + t.index, t.value]));
        const body = { ids: top.map((t) => [t.index]), skip_special_tokens: false };
        if (request.model) body.model = request.model;
        call('POST', '/decode', body)
          .then((reply) => {
            if (!reply.ok || !Array.isArray(reply.json)) return;
            box.querySelectorAll('.bar-label').forEach((label, i) => {
              label.textContent = reply.json[i] + ' (#' + top[i].index + ')';
            });
            box.dataset.decoded = 'true';
          })
          .catch(() => {});
        return box;
      },
    },
    rerank: {
      title: 'Rerank',
      body() {
        return { query: $('rr-query').value, texts: lines($('rr-texts').value) };
      },
      render(answer, request) {
        return bars(answer.map((a) => ['#' + (a.index + 1) + ' ' + request.texts[a.index], a.score]));
      },
    },
  };

  // --- drawing ---------------------------------------------------------------------------------------------

  function bars(rows) {
    // Scores are probabilities in [0, 1] unless asked otherwise (raw logits): then scale by the largest.
    const top = Math.max(1, ...rows.map(([, score]) => Math.abs(score)));
    const box = el('div', { className: 'bars' });
    for (const [label, score] of rows) {
      const fill = el('div', { className: 'bar-fill' });
      fill.style.width = (100 * Math.max(0, score / top)).toFixed(2) + '%';
      const row = el(
        'div',
        { className: 'bar' },
        el('span', { className: 'bar-label', textContent: label }),
        el('div', { className: 'bar-track' }, fill),
        el('span', { className: 'bar-score', textContent: score.toFixed(4) })
      );
      row.dataset.label = label;
      row.dataset.score = String(score);
      box.append(row);
    }
    return box;
  }

  // The API's offsets count Unicode code points (Python str indices); JavaScript strings index UTF-16 units,
  // so texts are sliced as arrays of code points.
  const codePoints = (text) => Array.from(text);
  const slice = (points, start, end) => points.slice(start, end).join('');

  function qaAnswer(context, answer) {
    const box = el('div');
    if (!answer || answer.answer === '' || answer.end <= answer.start) {
      box.append(el('p', { className: 'answer-line', textContent: 'No answer in the context.' }));
      if (answer) box.append(el('p', { className: 'hint', textContent: 'score ' + answer.score.toFixed(4) }));
      box.append(el('p', { className: 'passage', textContent: context }));
      return box;
    }
    const points = codePoints(context);
    box.append(
      el(
        'p',
        { className: 'answer-line' },
        'Answer: ',
        el('strong', { className: 'answer-text', textContent: answer.answer }),
        el('span', { className: 'hint', textContent: '  score ' + answer.score.toFixed(4) })
      ),
      el(
        'p',
        { className: 'passage' },
        slice(points, 0, answer.start),
        el('mark', { className: 'answer', textContent: slice(points, answer.start, answer.end) }),
        slice(points, answer.end)
      )
    );
    return box;
  }

  function hue(label) {
    let h = 0;
    for (const ch of label.replace(/^[BI]-/, '')) h = (h * 31 + ch.codePointAt(0)) % 360;
    return h;
  }

  function entities(text, found) {
    const points = codePoints(text);
    const passage = el('p', { className: 'passage' });
    const table = el('table', { className: 'entities' });
    table.append(
      el(
        'thead',
        null,
        el(
          'tr',
          null,
          ...['entity', 'label', 'score', 'offsets'].map((h) => el('th', { textContent: h }))
        )
      )
    );
    const body = el('tbody');
    let cursor = 0;
    const sorted = [...found].sort((a, b) => a.start - b.start);
    for (const entity of sorted) {
      const label = entity.entity_group || entity.entity;
      body.append(
        el(
          'tr',
          null,
          el('td', { textContent: entity.word }),
          el('td', { textContent: label }),
          el('td', { textContent: entity.score.toFixed(4) }),
          el('td', { textContent: entity.start + '–' + entity.end })
        )
      );
      if (entity.start < cursor) continue; // overlapping spans cannot both be marked: listed only
      passage.append(slice(points, cursor, entity.start));
      const mark = el(
        'mark',
        { className: 'entity' },
        el('span', { className: 'entity-text', textContent: slice(points, entity.start, entity.end) }),
        el('span', { className: 'entity-label', textContent: label })
      );
      mark.dataset.label = label;
      mark.style.setProperty('--hue', String(hue(label)));
      mark.title = label + ' ' + entity.score.toFixed(4);
      passage.append(mark);
      cursor = entity.end;
    }
    passage.append(slice(points, cursor));
    table.append(body);
    const box = el('div', null, passage);
    box.append(
      sorted.length
        ? el('div', { className: 'scroll-x' }, table)
        : el('p', { className: 'hint', textContent: 'No entities found.' })
    );
    return box;
  }

  function fillMask(text, answer) {
    // One mask: a list of candidates; several masks: one list per mask.
    const perMask = answer.length && Array.isArray(answer[0]) ? answer : [answer];
    const mask = $('fs-fill-mask').dataset.mask || '[MASK]';
    const parts = text.split(mask);
    const sentence = el('p', { className: 'mask-sentence' });
    parts.forEach((part, i) => {
      sentence.append(part);
      if (i === parts.length - 1) return;
      const candidates = perMask[i] || [];
      const list = el('ol');
      for (const c of candidates) {
        const item = el(
          'li',
          { className: 'candidate' },
          el('span', { className: 'cand-token', textContent: c.token_str }),
          el('span', { className: 'cand-score', textContent: c.score.toFixed(3) })
        );
        item.dataset.token = String(c.token);
        list.append(item);
      }
      const slot = el('span', { className: 'mask-slot' }, list);
      slot.dataset.mask = String(i);
      sentence.append(slot);
    });
    const box = el('div', null, sentence);
    if (perMask.length === 1 && perMask[0].length) {
      box.append(
        el(
          'p',
          { className: 'sequence hint' },
          'Best: ',
          el('span', { className: 'best-sequence', textContent: perMask[0][0].sequence })
        )
      );
    }
    return box;
  }

  function cosine(a, b) {
    let dot = 0;
    let na = 0;
    let nb = 0;
    for (let i = 0; i < a.length; i++) {
      dot += a[i] * b[i];
      na += a[i] * a[i];
      nb += b[i] * b[i];
    }
    return na && nb ? dot / Math.sqrt(na * nb) : 0;
  }

  function cosineMatrix(sentences, vectors) {
    const table = el('table', { className: 'cosine' });
    const head = el('tr', null, el('th'));
    sentences.forEach((_, j) => head.append(el('th', { textContent: String(j + 1) })));
    table.append(el('thead', null, head));
    const body = el('tbody');
    vectors.forEach((a, i) => {
      const row = el(
        'tr',
        null,
        el('th', { className: 'sentence', textContent: i + 1 + '. ' + shorten(sentences[i], 40) })
      );
      vectors.forEach((b, j) => {
        const value = cosine(a, b);
        const cell = el('td', { className: 'sim', textContent: value.toFixed(3) });
        cell.dataset.value = String(value);
        cell.dataset.row = String(i);
        cell.dataset.col = String(j);
        // Blue for similar, white for orthogonal, red for opposite.
        const strength = Math.min(1, Math.abs(value));
        cell.style.background =
          value >= 0 ? `hsl(220 80% ${100 - 45 * strength}%)` : `hsl(0 80% ${100 - 45 * strength}%)`;
        if (strength > 0.6) cell.style.color = '#fff';
        row.append(cell);
      });
      body.append(row);
    });
    table.append(body);
    const list = el('ol', { className: 'sentences' });
    for (const s of sentences) list.append(el('li', { textContent: s }));
    return el(
      'div',
      null,
      el('p', {
        className: 'hint',
        textContent:
          vectors.length + ' vectors of ' + (vectors[0] ? vectors[0].length : 0) + ' dimensions; cosine similarity:',
      }),
      el('div', { className: 'scroll-x' }, table),
      list
    );
  }

  function shorten(text, limit) {
    const points = codePoints(text);
    return points.length <= limit ? text : slice(points, 0, limit - 1) + '…';
  }

  // --- running ---------------------------------------------------------------------------------------------

  async function run() {
    const model = state.current;
    const task = model && TASKS[model.task];
    if (!task || model.state !== 'ready') return;
    const request = task.body();
    if (!state.legacy) request.model = model.name;
    const button = $('run');
    button.disabled = true;
    button.textContent = 'Running…';
    const result = $('result');
    result.hidden = false;
    result.setAttribute('aria-busy', 'true');
    $('error').hidden = true;
    $('output').replaceChildren();
    $('status').textContent = 'POST ' + model.endpoint + ' …';
    $('raw-request').textContent = 'POST ' + model.endpoint + '\n' + JSON.stringify(request, null, 2);
    $('raw-response').textContent = '';
    let reply;
    try {
      reply = await call('POST', model.endpoint, request);
    } catch (err) {
      showError('network error', err.message);
      finish();
      return;
    }
    $('status').textContent = 'POST ' + model.endpoint + ' → ' + reply.status + ' in ' + reply.ms.toFixed(0) + ' ms';
    $('raw-response').textContent = reply.json === null ? reply.text : JSON.stringify(reply.json, null, 2);
    if (reply.ok) {
      try {
        $('output').replaceChildren(task.render(reply.json, request));
      } catch (err) {
        showError('could not draw the answer', err.message);
      }
    } else {
      const kind = reply.json && reply.json.error_type ? ' ' + reply.json.error_type : '';
      showError(reply.status + kind, errorText(reply));
      if (reply.status === 401) askForKey(errorText(reply) + '.', run);
      if (reply.status === 503 && !state.legacy) loadModels();
    }
    finish();
  }

  function finish() {
    const button = $('run');
    button.textContent = 'Run';
    button.disabled = !state.current || state.current.state !== 'ready';
    $('result').removeAttribute('aria-busy');
    $('result').dataset.done = String(Number($('result').dataset.done || 0) + 1);
  }

  function showError(meta, message) {
    const box = $('error');
    box.querySelector('.error-meta').textContent = meta;
    box.querySelector('.error-message').textContent = message;
    box.hidden = false;
  }

  // --- wiring ----------------------------------------------------------------------------------------------

  $('model').addEventListener('change', (event) => selectModel(event.target.value));
  window.addEventListener('hashchange', () => {
    const name = decodeURIComponent(location.hash.slice(1));
    if (state.models.some((m) => m.name === name) && $('model').value !== name) {
      $('model').value = name;
      selectModel(name);
    }
  });
  $('task-form').addEventListener('submit', (event) => {
    event.preventDefault();
    run();
  });
  $('task-form').addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      run();
    }
  });
  $('fm-insert').addEventListener('click', () => {
    const area = $('fm-text');
    const mask = $('fs-fill-mask').dataset.mask || '[MASK]';
    const at = area.selectionStart ?? area.value.length;
    area.setRangeText(mask, at, area.selectionEnd ?? at, 'end');
    area.focus();
  });
  $('key-form').addEventListener('submit', (event) => {
    event.preventDefault();
    storeKey($('api-key').value.trim(), $('remember-key').checked);
    const panel = $('key-panel');
    panel.classList.remove('attention');
    panel.open = false;
    const retry = state.retry;
    state.retry = null;
    if (retry) retry();
  });
  $('forget-key').addEventListener('click', () => storeKey('', false));

  showKeyState();
  loadModels();
})();
