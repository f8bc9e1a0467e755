"""Data: annotation readers, validation, WebDataset shards, tiling, templates, collator, loaders."""
