"""core: models, data, checkpoints, editors, edits and held-out scoring; imports nothing else in editcore."""
