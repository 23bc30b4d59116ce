// clipgram's page: one script, no build step. The URL holds the view and the query, so a
// result can be shared and the back button works. Text from the library (captions, post
// captions) is user content: it is only ever set as textContent, never as HTML.
"use strict";

const $ = (sel) => document.querySelector(sel);
const el = (tag, { dataset = {}, ...props } = {}, ...children) => {
  const node = Object.assign(document.createElement(tag), props);
  Object.assign(node.dataset, dataset);  // dataset itself is read-only: fill it
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
};
const FILTERS = ["mode", "account", "since", "until", "hashtag", "min_likes", "label", "text"];
const PAGE = 24;

async function api(path, options) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function go(url) {
  history.pushState(null, "", url);
  route();
}

document.addEventListener("click", (event) => {
  const link = event.target.closest("a[data-nav]");
  if (link && !event.metaKey && !event.ctrlKey) {
    event.preventDefault();
    go(link.getAttribute("href"));
  }
});
window.addEventListener("popstate", route);

function card(hit) {
  const date = hit.taken_at ? hit.taken_at.slice(0, 10) : "";
  return el("div", { className: "card" },
    el("a", { href: `/image/${encodeURIComponent(hit.media_id)}`, dataset: { nav: "" } },
      el("img", { src: hit.thumbnail, alt: hit.caption || hit.media_id, loading: "lazy" })),
    el("div", { className: "body" },
      el("div", { className: "caption", textContent: hit.caption || "" }),
      el("div", { className: "post", textContent: hit.post_caption || "" }),
      el("div", { className: "meta" },
        el("span", { textContent: `@${hit.account} · ${date}` }),
        el("span", { textContent: `♥ ${hit.likes ?? 0} · ${hit.score.toFixed(3)}` })),
      el("div", { className: "actions" },
        el("a", { href: `/?like=${encodeURIComponent(hit.media_id)}`, dataset: { nav: "" },
                  className: "more", textContent: "more like this" }),
        hit.permalink ? el("a", { href: hit.permalink, target: "_blank", rel: "noopener",
                                  textContent: "post ↗" }) : null)));
}

function show(id) {
  for (const view of document.querySelectorAll("main > section")) view.hidden = view.id !== id;
  for (const link of document.querySelectorAll("header nav a")) {
    link.classList.toggle("active", link.getAttribute("href") === location.pathname);
  }
}

function fill(grid, hits) {
  grid.replaceChildren(...hits.map(card));
}

// --- search ----------------------------------------------------------------------------------

async function searchView(params) {
  show("search-view");
  const form = $("#search-form");
  form.q.value = params.get("q") || "";
  for (const name of FILTERS) form[name].value = params.get(name) || (name === "mode" ? "auto" : "");
  const page = Number(params.get("page") || 0);
  const note = $("#search-note");
  const grid = $("#results");
  $("#prev").hidden = $("#next").hidden = true;
  let path = null;
  let label = "";  // what the results are, beside their count
  if (params.get("like")) {
    path = `/api/similar/${encodeURIComponent(params.get("like"))}?k=${PAGE}&page=${page}`;
    label = `Images like ${params.get("like")}`;
  } else if (params.get("cluster") !== null && params.get("cluster") !== "") {
    path = `/api/clusters/${encodeURIComponent(params.get("cluster"))}?scope=${encodeURIComponent(params.get("scope") || "_all_accounts")}`;
    label = `Cluster ${params.get("cluster")}`;
  } else if (params.get("region")) {
    const [x0, y0, x1, y1] = params.get("region").split(",");
    path = `/api/map/region?${new URLSearchParams({ x0, y0, x1, y1, k: PAGE, scope: params.get("scope") || "_all_accounts" })}`;
    label = "Selected on the map";
  } else if (params.get("q")) {
    const query = new URLSearchParams({ q: params.get("q"), k: PAGE, page });
    for (const name of FILTERS) if (params.get(name)) query.set(name, params.get(name));
    if (params.get("literal")) query.set("literal", "true");
    path = `/api/search?${query}`;
  }
  $("#parsed").replaceChildren();
  $("#closest").hidden = true;
  if (!path) { grid.replaceChildren(); note.textContent = "Type what you are looking for, or drop an image."; return; }
  note.className = "note";
  note.textContent = label || "Searching…";  // a fresh app loads CLIP at its first query
  const seen = routes;
  try {
    const body = await api(path);
    if (seen !== routes) return;
    const judged = typeof body.matches === "number";
    fill(grid, judged ? body.results.slice(0, body.matches) : body.results);
    if (judged) closest(body.results.slice(body.matches), body.matches);
    chips(params, body.parsed);
    if (body.name) note.textContent = `${body.name} · ${body.results.length} images`;
    if (body.images !== undefined) note.textContent = `${label} · ${body.images} images` +
      (body.images > body.results.length ? ` (the first ${body.results.length})` : "") +
      (body.images ? "" : ": the box holds none; select a region around some points");
    if (body.mode) note.textContent = [label, !judged ? `${body.results.length} results (${body.mode})`
      : body.matches ? `${body.matches} of ${body.results.length} results match (${body.mode})`
      : `None of ${body.results.length} results match “${params.get("q")}” (${body.mode}): the closest are below; try other words`,
    ].filter(Boolean).join(" · ");
    $("#prev").hidden = !page;
    $("#next").hidden = body.results.length < PAGE || body.page === undefined;
  } catch (error) {
    if (seen !== routes) return;
    grid.replaceChildren();
    note.className = "note error";
    note.textContent = error.message;
  }
}

// The results judged not to match the query (relevance cutoff): behind a button, shown at once
// when nothing matches (the page is never empty without saying why).
function closest(hits, matches) {
  const button = $("#show-closest");
  const more = $("#closest-results");
  $("#closest").hidden = !hits.length;
  fill(more, hits);
  more.hidden = matches > 0;
  button.textContent = more.hidden ? `Show ${hits.length} closest anyway (not matching)`
                                   : `The ${hits.length} closest, none matching`;
  button.disabled = !more.hidden;
  button.onclick = () => { more.hidden = false; button.disabled = true; button.textContent = `The ${hits.length} closest, not matching`; };
}

// The filters the search read from the query, each a chip whose × searches without it: the
// query's other words as typed (literal), the other read filters as typed ones.
function chips(params, parsed) {
  if (!parsed) return;
  const read = [];  // [label, the URL parameters that keep this filter]
  if ((parsed.since || parsed.until) && !params.get("since") && !params.get("until")) {
    read.push([[parsed.since, parsed.until].map((d) => d || "…").join(" – "),
               { since: parsed.since, until: parsed.until }]);
  }
  if (parsed.accounts.length && !params.get("account")) read.push([`@${parsed.accounts[0]}`, { account: parsed.accounts[0] }]);
  if (parsed.hashtags.length && !params.get("hashtag")) read.push([`#${parsed.hashtags[0]}`, { hashtag: parsed.hashtags[0] }]);
  if (parsed.min_likes !== null && !params.get("min_likes")) {
    read.push([`♥ ≥ ${parsed.min_likes}`, { min_likes: String(parsed.min_likes) }]);
  }
  $("#parsed").replaceChildren(...read.map(([label], i) => {
    const chip = el("button", { type: "button", className: "chip", title: "search without this filter" },
                    `${label} ×`);
    chip.addEventListener("click", () => {
      const next = new URLSearchParams(params);
      next.set("q", parsed.text);
      next.set("literal", "1");
      next.delete("page");
      read.forEach(([, keep], j) => {
        if (j !== i) for (const [name, value] of Object.entries(keep)) if (value) next.set(name, value);
      });
      go(`/?${next}`);
    });
    return chip;
  }));
}

$("#search-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const form = event.target;
  const params = new URLSearchParams();
  if (form.q.value.trim()) params.set("q", form.q.value.trim());
  for (const name of FILTERS) if (form[name].value && form[name].value !== "auto") params.set(name, form[name].value);
  go(`/?${params}`);
});
for (const name of FILTERS) {
  $("#search-form")[name].addEventListener("change", () => {
    if ($("#search-form").q.value.trim()) $("#search-form").requestSubmit();
  });
}
function turn(delta) {
  const params = new URLSearchParams(location.search);
  params.set("page", Math.max(0, Number(params.get("page") || 0) + delta));
  go(`/?${params}`);
}
$("#prev").addEventListener("click", () => turn(-1));
$("#next").addEventListener("click", () => turn(1));

async function searchImage(file) {
  history.pushState(null, "", "/");
  show("search-view");
  const note = $("#search-note");
  note.className = "note";
  note.textContent = `Images like ${file.name}…`;
  try {
    const body = await api(`/api/search/image?k=${PAGE}`, { method: "POST", body: file,
                                                           headers: { "Content-Type": file.type || "application/octet-stream" } });
    fill($("#results"), body.results);
    note.textContent = `Images like ${file.name}: ${body.results.length} results`;
  } catch (error) {
    note.className = "note error";
    note.textContent = error.message;
  }
}
$("#upload").addEventListener("change", (event) => event.target.files[0] && searchImage(event.target.files[0]));
const box = $(".box");
box.addEventListener("dragover", (event) => { event.preventDefault(); box.classList.add("drop"); });
box.addEventListener("dragleave", () => box.classList.remove("drop"));
box.addEventListener("drop", (event) => {
  event.preventDefault();
  box.classList.remove("drop");
  if (event.dataTransfer.files[0]) searchImage(event.dataTransfer.files[0]);
});

// --- explore ---------------------------------------------------------------------------------

async function exploreView() {
  show("explore-view");
  const [state, clusters, duplicates] = await Promise.all(
    ["/api/status", "/api/clusters", "/api/duplicates"].map((p) => api(p).catch((e) => ({ error: e.message }))));
  $("#stages-note").textContent = state.error
    || ((state.stages || []).length ? "" : "No runs yet: `clipgram ingest ACCOUNT` fills this library.");
  $("#stages").hidden = !(state.stages || []).length;
  $("#stages tbody").replaceChildren(...(state.stages || []).map((r) => el("tr", {},
    ...[r.account, r.stage, r.done, r.pending, r.failed, r.last_run || "", r.last_error || ""]
      .map((v) => el("td", { textContent: String(v) })))));
  $("#failed ul").replaceChildren(...(state.failed || []).map((f) =>
    el("li", { textContent: `${f.account} ${f.media_id}: ${f.error}` })));
  $("#failed summary").textContent = `Failed items (${(state.failed || []).length})`;
  $("#clusters-note").textContent = clusters.error || clusters.hint || "";
  $("#clusters").replaceChildren(...(clusters.clusters || []).map((c) => el("div", { className: "cluster" },
    el("h3", {}, el("a", { href: `/?cluster=${c.cluster}&scope=${encodeURIComponent(c.scope)}`, dataset: { nav: "" },
                           textContent: `${c.name || "cluster " + c.cluster}` }),
       ` · ${c.images} images · ${c.scope_label}`),
    el("div", { className: "strip" }, ...c.samples.map((src) => el("img", { src, alt: "", loading: "lazy" }))))));
  $("#duplicates-note").textContent = duplicates.error || duplicates.hint || "";
  $("#duplicates").replaceChildren(...(duplicates.groups || []).map((g) => el("div", { className: "cluster" },
    el("h3", { textContent: `group ${g.group} · ${g.kind}` }),
    el("div", { className: "strip" }, ...g.images.map((i) =>
      el("a", { href: `/image/${encodeURIComponent(i.media_id)}`, dataset: { nav: "" } },
        el("img", { src: i.thumbnail, alt: i.media_id, title: `${i.media_id} (${i.similarity.toFixed(3)})` })))))));
}

// --- map: pan, zoom, hover, click, select; thumbnails once zoomed in -----------------------------

const PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];
const THUMBS_AT = 300;  // on-screen points at or below which pictures replace dots
const map = { points: [], xs: new Float32Array(0), ys: new Float32Array(0), cl: new Int32Array(0),
              scale: 1, dx: 0, dy: 0, hover: null, hidden: new Set(), thumbs: new Map(),
              box: null, bounds: null, scope: "_all_accounts", frame: 0, drawn: 0 };

const colour = (p) => p.cluster === null ? "#888" : PALETTE[p.cluster % PALETTE.length];

function mapXY(p, canvas) {
  const pad = 20, w = canvas.width - 2 * pad, h = canvas.height - 2 * pad;
  return [pad + (p.x * w) * map.scale + map.dx, pad + (p.y * h) * map.scale + map.dy];
}

function fromScreen(sx, sy, canvas) {  // canvas pixels → the stored map's coordinates
  const pad = 20, w = canvas.width - 2 * pad, h = canvas.height - 2 * pad, b = map.bounds;
  const nx = (sx - pad - map.dx) / (w * map.scale), ny = (sy - pad - map.dy) / (h * map.scale);
  return [b.x0 + nx * (b.x1 - b.x0), b.y0 + ny * (b.y1 - b.y0)];
}

function redraw() {  // at most once a frame, however many events ask
  if (!map.frame) map.frame = requestAnimationFrame(() => { map.frame = 0; drawMap(); });
}

function thumbnail(p) {  // fetched when first drawn: only what is on screen, once zoomed in
  let img = map.thumbs.get(p.sha256);
  if (!img) {
    img = new Image();
    img.onload = redraw;
    img.src = `/thumb/${p.sha256}`;
    map.thumbs.set(p.sha256, img);
  }
  return img;
}

const ABGR = (hex) => {  // a "#rrggbb" as one opaque pixel of a little-endian Uint32Array
  const v = parseInt(hex.slice(1), 16);
  return (0xff000000 | ((v & 0xff) << 16) | (v & 0xff00) | (v >> 16)) >>> 0;
};
const PIXELS = [ABGR("#888888"), ...PALETTE.map(ABGR)];  // index: cluster % palette + 1; 0 unclustered

function drawMap() {
  // every point's screen position is computed inline from typed arrays (no allocation per point):
  // 100k points pan at screen rate; dots are written as pixels, pictures drawn once few are shown
  const canvas = $("#map"), ctx = canvas.getContext("2d"), w = canvas.width, h = canvas.height;
  const pad = 20, sx = (w - 2 * pad) * map.scale, sy = (h - 2 * pad) * map.scale;
  const ox = pad + map.dx, oy = pad + map.dy, { xs, ys, cl } = map, n = xs.length, margin = 60;
  const hidden = map.hidden.size ? map.hidden : null;
  const shown = (i) => !hidden || !hidden.has(cl[i] < 0 ? null : cl[i]);
  let count = 0;
  for (let i = 0; i < n; i++) {
    const x = ox + xs[i] * sx, y = oy + ys[i] * sy;
    if (x > -margin && y > -margin && x < w + margin && y < h + margin && shown(i)) count++;
  }
  map.drawn = count;
  ctx.clearRect(0, 0, w, h);
  if (count <= THUMBS_AT) {
    const size = Math.round(Math.min(112, 28 + 8 * Math.log2(map.scale + 1)) * devicePixelRatio), half = size / 2;
    for (let i = 0; i < n; i++) {
      const x = ox + xs[i] * sx, y = oy + ys[i] * sy;
      if (!(x > -margin && y > -margin && x < w + margin && y < h + margin && shown(i))) continue;
      const p = map.points[i], img = thumbnail(p);
      ctx.fillStyle = colour(p);
      ctx.fillRect(x - half - 3, y - half - 3, size + 6, size + 6);
      if (img.complete && img.naturalWidth) {
        const side = Math.min(img.naturalWidth, img.naturalHeight);  // the centre square
        ctx.drawImage(img, (img.naturalWidth - side) / 2, (img.naturalHeight - side) / 2, side, side,
                      x - half, y - half, size, size);
      }
    }
  } else if (count) {
    const image = ctx.createImageData(w, h), pixels = new Uint32Array(image.data.buffer);
    const r = Math.max(1, Math.round(2 * devicePixelRatio));
    for (let i = 0; i < n; i++) {
      const x = Math.round(ox + xs[i] * sx), y = Math.round(oy + ys[i] * sy);
      if (x < r || y < r || x >= w - r || y >= h - r || !shown(i)) continue;
      const c = PIXELS[cl[i] < 0 ? 0 : cl[i] % PALETTE.length + 1];
      for (let dy = -r; dy <= r; dy++) pixels.fill(c, (y + dy) * w + x - r, (y + dy) * w + x + r + 1);
    }
    ctx.putImageData(image, 0, 0);
  }
  if (map.hover && !map.hidden.has(map.hover.cluster)) {
    const [x, y] = mapXY(map.hover, canvas);
    ctx.strokeStyle = "#000"; ctx.lineWidth = 2 * devicePixelRatio;
    ctx.strokeRect(x - 8, y - 8, 16, 16);
  }
  if (map.box) {
    const { x0, y0, x1, y1 } = map.box;
    ctx.fillStyle = "#4e79a722"; ctx.strokeStyle = "#4e79a7"; ctx.lineWidth = devicePixelRatio;
    ctx.fillRect(x0, y0, x1 - x0, y1 - y0); ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
  }
}

function canvasXY(event) {
  const canvas = $("#map"), r = canvas.getBoundingClientRect();
  return [(event.clientX - r.left) * canvas.width / r.width, (event.clientY - r.top) * canvas.height / r.height];
}

function nearest(event) {
  const canvas = $("#map"), [mx, my] = canvasXY(event), pad = 20;
  const sx = (canvas.width - 2 * pad) * map.scale, sy = (canvas.height - 2 * pad) * map.scale;
  const ox = pad + map.dx, oy = pad + map.dy, { xs, ys, cl } = map;
  const reach = map.drawn <= THUMBS_AT ? 40 * devicePixelRatio : 12;
  let best = -1, bestD = reach * reach;
  for (let i = 0; i < xs.length; i++) {
    const d = (ox + xs[i] * sx - mx) ** 2 + (oy + ys[i] * sy - my) ** 2;
    if (d < bestD && !map.hidden.has(cl[i] < 0 ? null : cl[i])) { best = i; bestD = d; }
  }
  return best < 0 ? null : map.points[best];
}

function legend(clusters) {
  $("#map-legend").replaceChildren(...clusters.map((c) => {
    const item = el("button", { type: "button", className: "legend", title: "show or hide this cluster" },
      el("span", { className: "swatch", style: `background:${PALETTE[c.cluster % PALETTE.length]}` }),
      `${c.name || "cluster " + c.cluster} (${c.images})`);
    item.addEventListener("click", () => {
      if (map.hidden.has(c.cluster)) map.hidden.delete(c.cluster); else map.hidden.add(c.cluster);
      item.classList.toggle("off", map.hidden.has(c.cluster));
      redraw();
    });
    return item;
  }));
}

async function mapView() {
  show("map-view");
  const canvas = $("#map");
  canvas.width = canvas.clientWidth * devicePixelRatio;
  canvas.height = canvas.clientHeight * devicePixelRatio;
  try {
    const body = await api("/api/map");
    const xs = body.points.map((p) => p.x), ys = body.points.map((p) => p.y);
    let [x0, x1, y0, y1] = [Infinity, -Infinity, Infinity, -Infinity];
    for (const x of xs) { x0 = Math.min(x0, x); x1 = Math.max(x1, x); }  // no spread: 100k arguments
    for (const y of ys) { y0 = Math.min(y0, y); y1 = Math.max(y1, y); }
    map.bounds = { x0, x1, y0, y1 };
    map.scope = body.scope;
    map.points = body.points.map((p) => ({ ...p, x: (p.x - x0) / ((x1 - x0) || 1), y: (p.y - y0) / ((y1 - y0) || 1) }));
    map.xs = Float32Array.from(map.points, (p) => p.x);
    map.ys = Float32Array.from(map.points, (p) => p.y);
    map.cl = Int32Array.from(map.points, (p) => p.cluster === null ? -1 : p.cluster);
    legend(body.clusters || []);
    $("#map-note").textContent = body.hint || `${body.points.length} images. Drag to pan, wheel to zoom in ` +
      "until pictures show, shift-drag to select a region, click a picture to open it; the legend hides a cluster.";
  } catch (error) {
    $("#map-note").textContent = error.message;
  }
  drawMap();
}

(function mapControls() {
  const canvas = $("#map"), tip = $("#map-tip");
  let drag = null;
  canvas.addEventListener("mousedown", (e) => {
    const [x, y] = canvasXY(e);
    if (e.shiftKey) map.box = { x0: x, y0: y, x1: x, y1: y };
    drag = { x: e.clientX, y: e.clientY, moved: false };
  });
  window.addEventListener("mousemove", (e) => {  // a box follows the pointer past the map's edges
    if (!map.box) return;
    [map.box.x1, map.box.y1] = canvasXY(e);
    tip.hidden = true;
    redraw();
  });
  window.addEventListener("mouseup", () => {
    const box = map.box;
    map.box = null;
    setTimeout(() => { drag = null; });
    if (box && Math.abs(box.x1 - box.x0) > 4 && Math.abs(box.y1 - box.y0) > 4) {
      const [ax, ay] = fromScreen(box.x0, box.y0, canvas), [bx, by] = fromScreen(box.x1, box.y1, canvas);
      const region = [ax, ay, bx, by].map((v) => v.toFixed(5)).join(",");
      go(`/?region=${region}&scope=${encodeURIComponent(map.scope)}`);
    } else if (box) redraw();
  });
  canvas.addEventListener("mousemove", (e) => {
    if (map.box) return;  // window's listener follows the box
    if (drag && (e.buttons & 1)) {
      const k = canvas.width / canvas.clientWidth;
      map.dx += (e.clientX - drag.x) * k; map.dy += (e.clientY - drag.y) * k;
      drag = { x: e.clientX, y: e.clientY, moved: true };
      tip.hidden = true;
      redraw();
      return;
    }
    const p = nearest(e);
    map.hover = p;
    tip.hidden = !p || map.drawn <= THUMBS_AT;  // zoomed in, the picture is on the map already
    if (p) {
      tip.src = `/thumb/${p.sha256}`;
      tip.style.left = `${e.offsetX + 14}px`;
      tip.style.top = `${e.offsetY + 14}px`;
    }
    redraw();
  });
  canvas.addEventListener("click", (e) => {
    if (drag && drag.moved) return;
    const p = nearest(e);
    if (p) go(`/image/${encodeURIComponent(p.media_id)}`);
  });
  canvas.addEventListener("wheel", (e) => {
    e.preventDefault();
    const [mx, my] = canvasXY(e);
    const f = e.deltaY < 0 ? 1.2 : 1 / 1.2;
    map.dx = mx - (mx - map.dx) * f; map.dy = my - (my - map.dy) * f; map.scale *= f;
    redraw();
  }, { passive: false });
})();

// --- one image -------------------------------------------------------------------------------

async function imageView(mediaId) {
  show("image-view");
  const facts = $("#image-facts");
  // the first request of a fresh app loads CLIP for the neighbours: say so meanwhile
  facts.replaceChildren(el("dd", { className: "note", textContent: "Loading…" }));
  $("#neighbours").replaceChildren();
  try {
    const body = await api(`/api/image/${encodeURIComponent(mediaId)}`);
    const i = body.image;
    $("#image-full").src = `/media/${i.sha256}`;
    $("#image-full").alt = i.caption || i.media_id;
    const rows = [["caption", i.caption], ["post", i.post_caption], ["account", `@${i.account}`],
                  ["taken", i.taken_at], ["likes", i.likes], ["comments", i.comments],
                  ["hashtags", (i.hashtags || []).map((t) => `#${t}`).join(" ")],
                  ["text in image", i.ocr_text],
                  ["size", `${i.width} × ${i.height}`], ["alt text", i.accessibility_caption],
                  ["labels", i.labels.map((l) => `${l.set}: ${l.label}`).join(", ")], ["media id", i.media_id]];
    facts.replaceChildren(...rows.filter(([, v]) => v !== null && v !== undefined && v !== "")
      .flatMap(([k, v]) => [el("dt", { textContent: k }), el("dd", { textContent: String(v) })]));
    if (i.permalink) facts.append(el("dt", { textContent: "post" }),
      el("dd", {}, el("a", { href: i.permalink, target: "_blank", rel: "noopener", textContent: i.permalink })));
    fill($("#neighbours"), body.similar);
  } catch (error) {
    facts.replaceChildren(el("dd", { className: "error", textContent: error.message }));
  }
}

// Each navigation counts: an answer that arrives after a newer navigation (a filter changed
// while the previous search was still loading) is dropped, not drawn over the newer one.
let routes = 0;

function route() {
  routes += 1;
  const path = location.pathname;
  if (path === "/explore") return exploreView();
  if (path === "/map") return mapView();
  if (path.startsWith("/image/")) return imageView(decodeURIComponent(path.slice("/image/".length)));
  return searchView(new URLSearchParams(location.search));
}
route();
