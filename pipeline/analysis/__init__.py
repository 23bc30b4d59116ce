"""Analysis over stored embeddings (never re-encoding images): zero-shot labels,
clusters, a 2-D map and near-duplicates, each written as a derived table."""
