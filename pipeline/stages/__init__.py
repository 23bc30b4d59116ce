"""The five stages of the DAG, one module each, in order; `dag.py` declares how they chain.

- scrape.py    new posts and their media rows, from Instagram, a folder or a URL list
- download.py  images into the content-addressed store, verified
- embed.py     CLIP vectors per image
- caption.py   CoCa captions per image
- publish.py   catalog.duckdb: views, search documents, full-text and vector indexes
"""
