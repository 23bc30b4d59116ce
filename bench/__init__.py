"""Benchmarks, outside the shipped package: `make bench` runs them all (`python -m bench`) and
writes bench/results.json.

- throughput.py  download, verify, decode, embed and caption rates (the `make bench` driver)
- search.py      text→image top-k over stored vectors (`python -m bench.search`)
- rerun.py       a no-op rerun of a 1,000-image account (`python -m bench.rerun`)
- odd_images.py  the real odd and broken image corpus ingested as a folder
"""
