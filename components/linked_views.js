// Linked views (components/linked_views.py): runs as gr.HTML's js_on_load with `element`, `trigger`, `props` and
// `watch`. Hovering a token (or arrow keys in the token row) redraws every view from the payload; hovering an image
// cell, or dragging a rectangle over the map, colours every token by its value there; a click (or Enter) pins a
// token at once, fetches a costly map for it if one is shown (from the page's own route; kept in the page), then
// fires `select`.
const root = element.querySelector('.lv-root');
const CSS_WIDTH = 480;  // each view, CSS pixels
const STRIP_WIDTH = 72;  // each small map of the strip, CSS pixels
// the prop the server sets when a token is selected elsewhere (a quoted prop name would make it a Gradio event)
const SELECTED_PROP = ['selected', 'token'].join('_');
let data = null, pinned = 0, shown = 0, opacity = 0.6, second = 'tam', colours = null, shared = false, smooth = false;
// costly maps fetched for this request: `${map name}|${token}` -> single-token view; `${method}|${token}` -> state
let fetched = {}, fetching = {};
// the brushed region [row0, col0, row1, col1] (kept after the drag), and the drag's first cell while dragging
let brush = null, brushStart = null;
const image = new Image();
// the page's own route for costly maps, under the app's root (which a proxy or a Space may move)
const costlyUrl = new URL(root.dataset.costlyRoute,
  `${((window.gradio_config && window.gradio_config.root) || window.location.href).replace(/\/?$/, '/')}`);

const bytes = (b64) => Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
const fmt = (v) => (v === 0 || (Math.abs(v) >= 1e-3 && Math.abs(v) < 1e4) ? String(Number(v.toPrecision(3)))
  : v.toExponential(2));
const word = (text) => (text.trim() ? text.trim() : JSON.stringify(text));
const rgb = (level) => `rgb(${colours[3 * level]},${colours[3 * level + 1]},${colours[3 * level + 2]})`;

const costlyNames = () => (data.costly || []).map((entry) => entry.name);
// the method a map belongs to: `relevancy_vit` is relevancy's
const methodOf = (name) => costlyNames().find((method) => name === method || name.startsWith(`${method}_`));

// a token's map as {caption, cells, low, high}: from the payload, or a costly map fetched for it (else null)
function mapOf(name, token) {
  const view = data.views.find((candidate) => candidate.name === name);
  if (view) {
    const n = data.grid.rows * data.grid.cols;
    return { caption: view.caption, cells: view.bytes.subarray(token * n, (token + 1) * n), low: view.low[token],
      high: view.high[token] };
  }
  return fetched[`${name}|${token}`] || null;
}

function captionOf(name) {
  const known = data.views.find((view) => view.name === name) || (data.costly || []).find((c) => c.name === name) ||
    Object.values(fetched).find((map) => map.name === name);
  return known ? known.caption : name;
}

const valueOf = (map, level) => map.low + (level / 255) * (map.high - map.low);

// the colour range a token's map is shown on: its own, or one range shared by every token of the answer (those
// fetched so far, for a costly map)
function rangeOf(name, token) {
  if (!shared) {
    const map = mapOf(name, token);
    return [map.low, map.high];
  }
  const maps = data.tokens.map((_, other) => mapOf(name, other)).filter(Boolean);
  return [Math.min(...maps.map((map) => map.low)), Math.max(...maps.map((map) => map.high))];
}

// the token's cells as colour levels on that range
function levelsOf(name, token) {
  const map = mapOf(name, token);
  if (!shared) return map.cells;
  const [low, high] = rangeOf(name, token);
  const span = high - low;
  return map.cells.map((level) => (span > 0 ? Math.round(((valueOf(map, level) - low) / span) * 255) : 0));
}

function build(value) {
  root.innerHTML = '';
  data = value && value.tokens ? value : null;
  if (!data) {
    root.innerHTML = '<p class="lv-empty">Generate an answer: its tokens and maps appear here.</p>';
    return;
  }
  colours = bytes(data.colours);
  data.views.forEach((view) => { view.bytes = bytes(view.cells); });
  if (root.dataset.request !== data.request_id) {
    pinned = 0;
    fetched = {};
    fetching = {};
    brush = null;
  }
  root.dataset.request = data.request_id;
  const selection = props[SELECTED_PROP];
  if (selection && selection.request_id === data.request_id) pinned = selection.token;
  pinned = Math.min(pinned, data.tokens.length - 1);
  shown = pinned;
  if (!data.views.some((view) => view.name === second) && !methodOf(second)) second = data.views[1].name;
  // a costly variant is offered once its method was fetched for this answer: until then, the method's own map
  if (methodOf(second) && !Object.values(fetched).some((map) => map.name === second)) second = methodOf(second);

  const row = document.createElement('div');
  row.className = 'lv-tokens';
  row.tabIndex = 0;
  row.title = 'Hover or use the arrow keys to look; click or press Enter to pin (the other tabs follow)';
  data.tokens.forEach((text, index) => {
    const span = document.createElement('span');
    span.className = 'lv-token';
    span.dataset.index = index;
    span.textContent = word(text);
    span.addEventListener('mouseenter', () => show(index));
    span.addEventListener('click', () => pin(index));
    row.appendChild(span);
  });
  row.addEventListener('mouseleave', () => show(pinned));
  row.addEventListener('keydown', (event) => {
    const step = { ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1 }[event.key];
    if (step) show(Math.max(0, Math.min(data.tokens.length - 1, shown + step)));
    else if (event.key === 'Enter' || event.key === ' ') pin(shown);
    else return;
    event.preventDefault();
  });

  const controls = document.createElement('div');
  controls.className = 'lv-controls';
  controls.innerHTML = '<label>Opacity <input type="range" class="lv-opacity" min="0" max="1" step="0.05"></label>' +
    '<label>Second view <select class="lv-second"></select></label>' +
    '<label><input type="checkbox" class="lv-shared"> One colour scale for every word</label>' +
    '<label><input type="checkbox" class="lv-smooth"> Smoothed</label>' +
    '<span class="lv-hint">Hover a cell of a map, or drag a rectangle over it: every word coloured by its ' +
    'value there (a click clears the rectangle)</span>';
  const slider = controls.querySelector('.lv-opacity');
  slider.value = opacity;
  slider.addEventListener('input', () => { opacity = Number(slider.value); redraw(); });
  const select = controls.querySelector('.lv-second');
  data.views.slice(1).forEach((view) => select.add(new Option(view.caption, view.name)));
  data.costly.forEach((entry) => {
    const option = new Option(`${entry.caption} (computed for the pinned word)`, entry.name);
    option.title = entry.description;
    select.add(option);
  });
  // a costly method's variants, once fetched, are views of their own
  Object.values(fetched).forEach((map) => {
    if (![...select.options].some((option) => option.value === map.name)) select.add(new Option(map.caption, map.name));
  });
  select.value = second;
  select.addEventListener('change', () => {
    second = select.value;
    if (methodOf(second)) fetchCostly(methodOf(second), pinned);
    redraw();
  });
  const sharedBox = controls.querySelector('.lv-shared');
  sharedBox.checked = shared;
  sharedBox.addEventListener('change', () => { shared = sharedBox.checked; redraw(); });
  const smoothBox = controls.querySelector('.lv-smooth');
  smoothBox.checked = smooth;
  smoothBox.addEventListener('change', () => { smooth = smoothBox.checked; redraw(); });

  const views = document.createElement('div');
  views.className = 'lv-views';
  views.innerHTML = [0, 1].map(() => '<figure class="lv-view"><figcaption></figcaption><canvas class="lv-map">' +
    '</canvas><div class="lv-progress"></div><div class="lv-bar"><span class="lv-low"></span><canvas class="lv-scale" width="256" height="1">' +
    '</canvas><span class="lv-high"></span></div><div class="lv-cell">&nbsp;</div></figure>').join('');
  const [width, height] = data.image_size;
  views.querySelectorAll('canvas.lv-map').forEach((canvas) => {
    const ratio = window.devicePixelRatio || 1;
    canvas.width = Math.round(CSS_WIDTH * ratio);
    canvas.height = Math.round((CSS_WIDTH * height / width) * ratio);
    canvas.style.width = `${CSS_WIDTH}px`;
    canvas.style.aspectRatio = `${width} / ${height}`;
    canvas.addEventListener('mousedown', (event) => {
      brushStart = cellAt(canvas, event);
      event.preventDefault();  // no text selection while dragging
    });
    canvas.addEventListener('mousemove', (event) => pointerMoved(canvas, event));
    canvas.addEventListener('mouseup', (event) => brushEnded(canvas, event));
    canvas.addEventListener('mouseleave', () => {
      brushStart = null;
      if (!brush) reverse(canvas, null);
    });
  });
  views.querySelectorAll('canvas.lv-scale').forEach((scale) => {
    const context = scale.getContext('2d');
    for (let level = 0; level < 256; level++) { context.fillStyle = rgb(level); context.fillRect(level, 0, 1, 1); }
  });
  const strip = document.createElement('div');
  strip.className = 'lv-strip-box';
  strip.innerHTML = '<div class="lv-strip-title"></div><div class="lv-strip"></div>';
  data.tokens.forEach((text, index) => {
    const figure = document.createElement('figure');
    figure.dataset.index = index;
    const canvas = document.createElement('canvas');
    canvas.width = STRIP_WIDTH * (window.devicePixelRatio || 1);
    canvas.height = Math.round(canvas.width * height / width);
    canvas.style.width = `${STRIP_WIDTH}px`;
    const caption = document.createElement('figcaption');
    caption.textContent = word(text);
    figure.append(canvas, caption);
    figure.addEventListener('mouseenter', () => show(index));
    figure.addEventListener('click', () => pin(index));
    strip.querySelector('.lv-strip').appendChild(figure);
  });
  strip.querySelector('.lv-strip').addEventListener('mouseleave', () => show(pinned));
  const text = document.createElement('div');
  text.className = 'lv-text-box';
  text.innerHTML = '<div class="lv-strip-title">Attention to the text (prompt, then answer) of the word shown, ' +
    'with the layers, heads and aggregation of the attention view</div><div class="lv-text"></div>';
  data.text.bytes = bytes(data.text.cells);
  data.text.texts.forEach((piece, k) => {
    const span = document.createElement('span');
    span.className = 'lv-text-token' + (data.text.positions[k] >= data.text.answer_start ? ' lv-answer' : '');
    span.textContent = word(piece);
    text.querySelector('.lv-text').appendChild(span);
  });
  const list = document.createElement('div');
  list.className = 'lv-reverse';
  root.append(row, list, controls, views, strip, text);
  image.onload = redraw;  // the maps are drawn at once, the picture under them when it has loaded
  image.src = data.image;
  if (methodOf(second)) fetchCostly(methodOf(second), pinned);
  redraw();
}

// the image's grid cells in their colours over the picture already drawn on `context`
function paintCells(context, cells, sx, sy) {
  const { rows, cols, box } = data.grid;
  context.globalAlpha = opacity;
  if (smooth) {  // the grid as one small picture, scaled onto the box with the browser's interpolation
    const grid = new OffscreenCanvas(cols, rows);
    const pixels = new ImageData(cols, rows);
    cells.forEach((level, k) => {
      pixels.data.set([colours[3 * level], colours[3 * level + 1], colours[3 * level + 2], 255], 4 * k);
    });
    grid.getContext('2d').putImageData(pixels, 0, 0);
    context.imageSmoothingEnabled = true;
    context.drawImage(grid, box[0] * sx, box[1] * sy, (box[2] - box[0]) * sx, (box[3] - box[1]) * sy);
    context.globalAlpha = 1;
    return;
  }
  for (let r = 0; r < rows; r++) {
    const y0 = (box[1] + (r * (box[3] - box[1])) / rows) * sy;
    const y1 = (box[1] + ((r + 1) * (box[3] - box[1])) / rows) * sy;
    for (let c = 0; c < cols; c++) {
      const x0 = (box[0] + (c * (box[2] - box[0])) / cols) * sx;
      const x1 = (box[0] + ((c + 1) * (box[2] - box[0])) / cols) * sx;
      context.fillStyle = rgb(cells[r * cols + c]);
      context.fillRect(x0, y0, x1 - x0, y1 - y0);
    }
  }
  context.globalAlpha = 1;
}

// the small multiples of TAM's figures: the second view's map under every answer word, in one row
function drawStrip() {
  const [width, height] = data.image_size;
  root.querySelectorAll('.lv-strip canvas').forEach((canvas, token) => {
    const context = canvas.getContext('2d');
    const sx = canvas.width / width, sy = canvas.height / height;
    context.globalAlpha = 1;
    if (image.complete && image.naturalWidth) context.drawImage(image, 0, 0, canvas.width, canvas.height);
    const known = mapOf(second, token);  // a costly map: the words fetched so far
    if (known) paintCells(context, levelsOf(second, token), sx, sy);
    canvas.dataset.map = second;
    canvas.dataset.state = known ? 'drawn' : 'not computed';
  });
  const title = root.querySelector('.lv-strip-title');
  const scale = shared ? 'one colour scale for every word' : 'each on its own scale';
  const costly = methodOf(second) ? ', the words pinned so far' : ', every answer word';
  if (title) title.textContent = `${captionOf(second)}${costly} (${scale}; hover or click one)`;
}

// everything: the views and the strip (on a new payload, picture, opacity or second view; a hover redraws the views)
function redraw() {
  draw();
  drawStrip();
}

// the shown word's attention to every text position, as coloured tokens (CircuitsVis' pattern view)
function drawText() {
  const pattern = data.text;
  const n = pattern.positions.length;
  const levels = pattern.bytes.subarray(shown * n, (shown + 1) * n);
  const box = root.querySelector('.lv-text');
  box.dataset.token = shown;
  box.dataset.values = levels.join(',');
  const source = data.text.answer_start - 1 + shown;  // the position predicting the shown word
  box.querySelectorAll('.lv-text-token').forEach((span, k) => {
    const after = pattern.positions[k] >= source + 1;
    span.style.background = after ? '' : rgb(levels[k]);
    span.style.color = after ? 'var(--body-text-color-subdued)' : (levels[k] > 150 ? '#000' : '#fff');
    span.title = after ? 'after the word: not attended' :
      `${fmt(valueOf({ low: pattern.low[shown], high: pattern.high[shown] }, levels[k]))}`;
  });
}


function draw() {
  if (!data) return;
  const start = performance.now();
  const [width, height] = data.image_size;
  root.querySelectorAll('.lv-token, .lv-strip figure').forEach((span) => {
    const index = Number(span.dataset.index);
    span.classList.toggle('lv-shown', index === shown);
    span.classList.toggle('lv-pinned', index === pinned);
  });
  root.querySelectorAll('.lv-view').forEach((figure, index) => {
    const name = [data.views[0].name, second][index];
    const canvas = figure.querySelector('canvas.lv-map');
    const context = canvas.getContext('2d');
    const sx = canvas.width / width, sy = canvas.height / height;
    context.globalAlpha = 1;
    if (image.complete && image.naturalWidth) context.drawImage(image, 0, 0, canvas.width, canvas.height);
    const map = mapOf(name, shown);
    const cells = map ? levelsOf(name, shown) : [];
    if (map) paintCells(context, cells, sx, sy);
    if (brush) drawBrush(context, sx, sy);
    canvas.dataset.map = name;
    canvas.dataset.token = shown;
    canvas.dataset.cells = cells.join(',');
    canvas.dataset.state = map ? 'drawn' : 'not computed';
    // a costly map's computation on the server, and its whole fetch
    canvas.dataset.seconds = map && map.seconds !== undefined ? map.seconds : '';
    canvas.dataset.fetchMs = map && map.fetchMs !== undefined ? map.fetchMs.toFixed(1) : '';
    canvas.dataset.shared = shared;
    canvas.dataset.smooth = smooth;
    figure.querySelector('figcaption').textContent =
      `«${word(data.tokens[shown])}» (token ${shown}) — ${captionOf(name)}` + (shown === pinned ? ' · pinned' : '');
    figure.querySelector('.lv-progress').textContent = map ? '' : progressNote(name);
    const [low, high] = map ? rangeOf(name, shown) : [NaN, NaN];
    figure.querySelector('.lv-low').textContent = map ? fmt(low) : '';
    figure.querySelector('.lv-high').textContent = map ? fmt(high) + (shared ? ' (every word)' : '') : '';
  });
  drawText();
  const elapsed = performance.now() - start;
  root.querySelectorAll('canvas.lv-map').forEach((canvas) => { canvas.dataset.drawnMs = elapsed.toFixed(3); });
}

function show(index) {
  if (!data || index === shown) return;
  shown = index;
  draw();
}

// what a view of a costly map says while the shown word's map is not in the page
function progressNote(name) {
  const method = methodOf(name);
  const state = fetching[`${method}|${shown}`];
  if (state && state.error) return `${method}: ${state.error}`;
  if (state) return `Computing ${captionOf(method)} for «${word(data.tokens[shown])}»…`;
  return `${captionOf(method)} is computed for the pinned word: click «${word(data.tokens[shown])}» to compute it`;
}

// a costly method's maps of one token from the server, once (again after a failure); resolves when they are in the
// page (or failed)
function fetchCostly(method, token) {
  const key = `${method}|${token}`;
  if (fetching[key] && !fetching[key].error) return fetching[key].done;
  const request = data.request_id;
  const state = {};
  const start = performance.now();
  state.done = fetch(costlyUrl, { method: 'POST', headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ request_id: request, method, token }) })
    // a refusal's one line (bad query, unknown request, rate limit, busy), or the status where there is none
    .then((response) => response.json().catch(() => ({})).then((answer) => (response.ok && answer.views ? answer
      : { error: answer.error || `the page's server answered ${response.status}; click the word to retry` })))
    .then((answer) => {
      if (request !== data.request_id) return;  // a new answer came meanwhile
      if (answer.error) {
        state.error = answer.error;
        return;
      }
      answer.views.forEach((view) => {
        fetched[`${view.name}|${token}`] = { name: view.name, caption: view.caption, cells: bytes(view.cells),
          low: view.low[0], high: view.high[0], seconds: answer.seconds, fetchMs: performance.now() - start };
      });
      const select = root.querySelector('.lv-second');
      answer.views.forEach((view) => {
        if (![...select.options].some((option) => option.value === view.name)) {
          select.add(new Option(view.caption, view.name));
        }
      });
    }, (failure) => {
      state.error = `the page's server cannot be reached (${failure.message || failure}); click the word to retry`;
    })
    .finally(() => { if (request === data.request_id) redraw(); });
  fetching[key] = state;
  return state.done;
}

function pin(index) {
  if (!data) return;
  pinned = index;
  shown = index;
  draw();
  const method = methodOf(second);
  // the server-side panels follow after a costly map is in (both would share the server's CPU)
  const ready = method ? fetchCostly(method, index) : Promise.resolve();
  // after the pinned views are painted: Gradio marks every panel of the other tabs pending, which takes frames
  ready.then(() => requestAnimationFrame(() => setTimeout(() => {
    if (pinned === index) trigger('select', { index, value: data.tokens[index], selected: true });
  })));
}

// pinned from elsewhere (the answer strip): no `select`, the server knows already
function pinQuietly(selection) {
  if (!data || !selection || selection.request_id !== data.request_id || selection.token === pinned) return;
  pinned = selection.token;
  shown = pinned;
  draw();
  if (methodOf(second)) fetchCostly(methodOf(second), pinned);
}

// the cell under the pointer, as rendering.cell_at finds it in original-image pixels (null outside the grid)
function cellAt(canvas, event) {
  const { rows, cols, box } = data.grid;
  const rect = canvas.getBoundingClientRect();
  const x = ((event.clientX - rect.left) / rect.width) * data.image_size[0];
  const y = ((event.clientY - rect.top) / rect.height) * data.image_size[1];
  if (x < box[0] || x >= box[2] || y < box[1] || y >= box[3]) return null;
  return [Math.floor(((y - box[1]) / (box[3] - box[1])) * rows), Math.floor(((x - box[0]) / (box[2] - box[0])) * cols)];
}

const regionOf = (a, b) => [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[0], b[0]), Math.max(a[1], b[1])];

function pointerMoved(canvas, event) {
  const cell = cellAt(canvas, event);
  if (brushStart && cell) {  // dragging: the rectangle follows the pointer
    brush = regionOf(brushStart, cell);
    draw();
    reverse(canvas, brush);
  } else if (!brush) {
    reverse(canvas, cell && [...cell, ...cell]);
  }
}

function brushEnded(canvas, event) {
  const cell = cellAt(canvas, event);
  if (brushStart && cell && cell[0] === brushStart[0] && cell[1] === brushStart[1]) {  // a click: no rectangle
    brush = null;
    draw();
    reverse(canvas, [...cell, ...cell]);
  }
  brushStart = null;
}

function drawBrush(context, sx, sy) {
  const { rows, cols, box } = data.grid;
  const cw = (box[2] - box[0]) / cols, ch = (box[3] - box[1]) / rows;
  context.strokeStyle = '#22d3ee';
  context.lineWidth = 2 * (window.devicePixelRatio || 1);
  context.strokeRect((box[0] + brush[1] * cw) * sx, (box[1] + brush[0] * ch) * sy, (brush[3] - brush[1] + 1) * cw * sx,
    (brush[2] - brush[0] + 1) * ch * sy);
}

// reverse view: every word's mean value over a region [row0, col0, row1, col1] of the hovered map (a cell is a
// region of one), the words coloured on a scale shared by them and the strongest listed with their values
function reverse(canvas, region) {
  const tokens = root.querySelectorAll('.lv-token');
  const note = canvas.parentElement.querySelector('.lv-cell');
  const list = root.querySelector('.lv-reverse');
  if (!region) {
    note.innerHTML = '&nbsp;';
    list.textContent = '';
    delete root.dataset.reverseRegion;
    delete root.dataset.reverseValues;
    tokens.forEach((span) => {
      span.style.background = '';
      span.style.color = '';
      span.removeAttribute('data-value');
      span.removeAttribute('title');
    });
    return;
  }
  const name = canvas.dataset.map;
  const cols = data.grid.cols;
  const indices = [];
  for (let r = region[0]; r <= region[2]; r++) for (let c = region[1]; c <= region[3]; c++) indices.push(r * cols + c);
  const meanOf = (token) => {
    const map = mapOf(name, token);
    return map ? indices.reduce((sum, k) => sum + valueOf(map, map.cells[k]), 0) / indices.length : null;
  };
  const values = data.tokens.map((_, token) => meanOf(token));
  const where = region[0] === region[2] && region[1] === region[3] ? `row ${region[0]}, col ${region[1]}`
    : `rows ${region[0]}-${region[2]}, cols ${region[1]}-${region[3]} (${indices.length} cells, mean)`;
  note.textContent = values[shown] === null ? where : `${where}: ${fmt(values[shown])}`;
  const top = Math.max(...values.filter((value) => value !== null)) || 1;
  root.dataset.reverseRegion = region.join(',');
  root.dataset.reverseValues = values.map((value) => (value === null ? '' : value)).join(',');
  tokens.forEach((span, token) => {
    if (values[token] === null) return;
    const level = Math.max(0, Math.min(255, Math.round((values[token] / top) * 255)));
    span.style.background = rgb(level);
    span.style.color = level > 150 ? '#000' : '#fff';
    span.dataset.value = fmt(values[token]);
    span.title = `${captionOf(name)} at ${where}: ${fmt(values[token])}`;
  });
  const ranked = values.map((value, token) => [value, token]).filter(([value]) => value !== null)
    .sort((a, b) => b[0] - a[0]).slice(0, 5);
  list.textContent = `Words looking at ${where} (${captionOf(name)}): ` +
    ranked.map(([value, token]) => `«${word(data.tokens[token])}» ${fmt(value)}`).join(' · ');
}

build(props.value);
watch('value', () => build(props.value));
watch(SELECTED_PROP, () => pinQuietly(props[SELECTED_PROP]));
