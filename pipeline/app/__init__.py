"""`clipgram app`: the library served over HTTP — a search page, explore views, and the JSON API
the page uses (its OpenAPI schema at /docs).

library.py   the published catalog, reopened when an ingest publishes a new one; CLIP loaded once
thumbs.py    content-addressed thumbnails, made once and cached beside the data
server.py    the FastAPI app: pages, /api/*, /thumb/{sha256}, the token check
static/      the page: plain HTML, CSS and JavaScript, no build step
"""
