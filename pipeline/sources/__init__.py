"""Where posts come from. Every source yields the same posts/media rows."""
