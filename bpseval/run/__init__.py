"""A run directory: one scan (the catalog), the merge of a step, its cache, and the scored run."""
