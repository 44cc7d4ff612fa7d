"""One guest's backup: modes, the freeze window, block jobs, data assembly, cleanup.

``assembler`` turns the ranges an NBD export receives into whole VMA clusters.
"""
