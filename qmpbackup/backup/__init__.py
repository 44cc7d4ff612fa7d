"""One guest's backup: modes, the freeze window, block jobs, data assembly, cleanup."""
