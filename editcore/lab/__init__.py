"""lab: what the app and `measure` serve (sessions, sources, comparisons, measurements), over core and experiments."""
