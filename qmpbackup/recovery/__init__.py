"""Recovery: nothing a run creates outlives it. One home for what is recorded and how it is undone.

- :mod:`.journal`: the crash-safe per-VM list of resources (file format, lock);
- :mod:`.kinds`: every kind of entry and its data schema (the registry);
- :mod:`.instance`: which QEMU process an entry belongs to;
- :mod:`.state`: the state dir and the paths in it;
- :mod:`.spawned`: records of QEMUs we spawned, and killing orphans;
- :mod:`.host_files`: the partial archive and the run folder, journaled;
- :mod:`.steps`: the undo step of each kind;
- :mod:`.replay`: undoing a journal (the backup's start and end, and cleanup);
- :mod:`.cleanup`: ``qmpbackup cleanup`` (journal, then by name, then files).
"""
