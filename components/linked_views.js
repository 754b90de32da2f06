// Linked views (components/linked_views.py): runs as gr.HTML's js_on_load with `element`, `trigger`, `props`,
// `watch`. Hovering a token (or arrow keys in the token row) redraws every view from the payload; hovering an image
// cell colours every token by its attention to that cell; a click (or Enter) pins a token and fires `select`.
const root = element.querySelector('.lv-root');
const CSS_WIDTH = 480;  // each view, CSS pixels
const STRIP_WIDTH = 72;  // each small map of the strip, CSS pixels
let data = null, pinned = 0, shown = 0, opacity = 0.6, second = 1, colours = null, shared = false, smooth = false;
const image = new Image();

const bytes = (b64) => Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
const fmt = (v) => (v === 0 || (Math.abs(v) >= 1e-3 && Math.abs(v) < 1e4) ? String(Number(v.toPrecision(3)))
  : v.toExponential(2));
const word = (text) => (text.trim() ? text.trim() : JSON.stringify(text));
const rgb = (level) => `rgb(${colours[3 * level]},${colours[3 * level + 1]},${colours[3 * level + 2]})`;

function cellsOf(view, token) {
  const n = data.grid.rows * data.grid.cols;
  return view.bytes.subarray(token * n, (token + 1) * n);
}

function valueOf(view, token, level) {
  return view.low[token] + (level / 255) * (view.high[token] - view.low[token]);
}

// the colour range a token's map is shown on: its own, or one range shared by every token of the answer
function rangeOf(view, token) {
  return shared ? [Math.min(...view.low), Math.max(...view.high)] : [view.low[token], view.high[token]];
}

// the token's cells as colour levels on that range
function levelsOf(view, token) {
  if (!shared) return cellsOf(view, token);
  const [low, high] = rangeOf(view, token);
  const span = high - low;
  return cellsOf(view, token).map((level) => (span > 0 ? Math.round(((valueOf(view, token, level) - low) / span) * 255)
    : 0));
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
  if (root.dataset.request !== data.request_id) pinned = 0;
  root.dataset.request = data.request_id;
  pinned = Math.min(pinned, data.tokens.length - 1);
  shown = pinned;
  second = Math.min(second, data.views.length - 1);

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
    '<span class="lv-hint">Hover a cell of a map: every token coloured by its attention to that cell</span>';
  const slider = controls.querySelector('.lv-opacity');
  slider.value = opacity;
  slider.addEventListener('input', () => { opacity = Number(slider.value); redraw(); });
  const select = controls.querySelector('.lv-second');
  data.views.slice(1).forEach((view, index) => select.add(new Option(view.caption, index + 1)));
  select.value = second;
  select.addEventListener('change', () => { second = Number(select.value); redraw(); });
  const sharedBox = controls.querySelector('.lv-shared');
  sharedBox.checked = shared;
  sharedBox.addEventListener('change', () => { shared = sharedBox.checked; redraw(); });
  const smoothBox = controls.querySelector('.lv-smooth');
  smoothBox.checked = smooth;
  smoothBox.addEventListener('change', () => { smooth = smoothBox.checked; redraw(); });

  const views = document.createElement('div');
  views.className = 'lv-views';
  views.innerHTML = [0, 1].map(() => '<figure class="lv-view"><figcaption></figcaption><canvas class="lv-map">' +
    '</canvas><div class="lv-bar"><span class="lv-low"></span><canvas class="lv-scale" width="256" height="1">' +
    '</canvas><span class="lv-high"></span></div><div class="lv-cell">&nbsp;</div></figure>').join('');
  const [width, height] = data.image_size;
  views.querySelectorAll('canvas.lv-map').forEach((canvas) => {
    const ratio = window.devicePixelRatio || 1;
    canvas.width = Math.round(CSS_WIDTH * ratio);
    canvas.height = Math.round((CSS_WIDTH * height / width) * ratio);
    canvas.style.width = `${CSS_WIDTH}px`;
    canvas.style.aspectRatio = `${width} / ${height}`;
    canvas.addEventListener('mousemove', (event) => hoverCell(canvas, event));
    canvas.addEventListener('mouseleave', () => hoverCell(canvas, null));
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
  root.append(row, controls, views, strip, text);
  image.onload = redraw;  // the maps are drawn at once, the picture under them when it has loaded
  image.src = data.image;
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
  const view = data.views[second] || data.views[0];
  const [width, height] = data.image_size;
  root.querySelectorAll('.lv-strip canvas').forEach((canvas, token) => {
    const context = canvas.getContext('2d');
    const sx = canvas.width / width, sy = canvas.height / height;
    context.globalAlpha = 1;
    if (image.complete && image.naturalWidth) context.drawImage(image, 0, 0, canvas.width, canvas.height);
    paintCells(context, levelsOf(view, token), sx, sy);
    canvas.dataset.map = view.name;
  });
  const title = root.querySelector('.lv-strip-title');
  const scale = shared ? 'one colour scale for every word' : 'each on its own scale';
  if (title) title.textContent = `${view.caption}, every answer word (${scale}; hover or click one)`;
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
      `${fmt(valueOf(pattern, shown, levels[k]))}`;
  });
}

function shownViews() {
  return [data.views[0], data.views[second]].filter(Boolean);
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
  const figures = root.querySelectorAll('.lv-view');
  const views = shownViews();
  figures.forEach((figure, index) => {
    const view = views[index];
    figure.hidden = !view;
    if (!view) return;
    const canvas = figure.querySelector('canvas.lv-map');
    const context = canvas.getContext('2d');
    const sx = canvas.width / width, sy = canvas.height / height;
    context.globalAlpha = 1;
    if (image.complete && image.naturalWidth) context.drawImage(image, 0, 0, canvas.width, canvas.height);
    const cells = levelsOf(view, shown);
    paintCells(context, cells, sx, sy);
    canvas.dataset.map = view.name;
    canvas.dataset.token = shown;
    canvas.dataset.cells = cells.join(',');
    canvas.dataset.shared = shared;
    canvas.dataset.smooth = smooth;
    figure.querySelector('figcaption').textContent =
      `«${word(data.tokens[shown])}» (token ${shown}) — ${view.caption}` + (shown === pinned ? ' · pinned' : '');
    const [low, high] = rangeOf(view, shown);
    figure.querySelector('.lv-low').textContent = fmt(low);
    figure.querySelector('.lv-high').textContent = fmt(high) + (shared ? ' (every word)' : '');
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

function pin(index) {
  if (!data) return;
  pinned = index;
  shown = index;
  draw();
  trigger('select', { index, value: data.tokens[index], selected: true });
}

// the cell under the pointer, as rendering.cell_at finds it in original-image pixels
function hoverCell(canvas, event) {
  const tokens = root.querySelectorAll('.lv-token');
  const note = canvas.parentElement.querySelector('.lv-cell');
  const { rows, cols, box } = data.grid;
  let cell = null;
  if (event) {
    const rect = canvas.getBoundingClientRect();
    const x = ((event.clientX - rect.left) / rect.width) * data.image_size[0];
    const y = ((event.clientY - rect.top) / rect.height) * data.image_size[1];
    if (x >= box[0] && x < box[2] && y >= box[1] && y < box[3]) {
      cell = [Math.floor(((y - box[1]) / (box[3] - box[1])) * rows),
        Math.floor(((x - box[0]) / (box[2] - box[0])) * cols)];
    }
  }
  if (!cell) {
    note.innerHTML = '&nbsp;';
    delete root.dataset.reverseCell;
    tokens.forEach((span) => {
      span.style.background = '';
      span.style.color = '';
      span.removeAttribute('data-value');
      span.removeAttribute('title');
    });
    return;
  }
  const view = data.views.find((candidate) => candidate.name === canvas.dataset.map);
  const index = cell[0] * cols + cell[1];
  const here = valueOf(view, shown, cellsOf(view, shown)[index]);
  note.textContent = `row ${cell[0]}, col ${cell[1]}: ${fmt(here)}`;
  // reverse view: every token's value at this cell, coloured on a scale shared by the tokens
  const values = data.tokens.map((_, token) => valueOf(view, token, cellsOf(view, token)[index]));
  const top = Math.max(...values) || 1;
  root.dataset.reverseCell = cell.join(',');
  tokens.forEach((span, token) => {
    const level = Math.max(0, Math.round((values[token] / top) * 255));
    span.style.background = rgb(level);
    span.style.color = level > 150 ? '#000' : '#fff';
    span.dataset.value = fmt(values[token]);
    span.title = `${view.caption} at row ${cell[0]}, col ${cell[1]}: ${fmt(values[token])}`;
  });
}

build(props.value);
watch('value', () => build(props.value));
