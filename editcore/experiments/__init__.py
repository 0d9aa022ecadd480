"""experiments: the paper's experiments over core (fixers, the edit protocol, training, NAE); never imports lab."""
