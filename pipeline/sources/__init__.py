"""Where posts come from: Instagram (live or recorded), a folder, a URL list. Each writes the same
posts and media rows; the scrape stage (`stages/scrape.py`) picks one."""
