"""Fleecing storages: where copy-before-write keeps old data during a live backup.

Modules, bottom up: ``errors``; ``runner`` (external tools, injectable); ``probe`` (free
space, thin, discard, rotational); ``storage`` (storage.cfg sections we can fleece on, the
space rule); ``images`` (``vm-<vmid>-fleece-<n>`` on dir/lvmthin/zfspool); ``graph`` (one
drive's copy-before-write + snapshot-access graph, journal undo steps); ``reclaim``
(giving space back: ``discard-source`` or TRIMs through QEMU's NBD server, with
:mod:`qmpbackup.nbd.client`); ``drives`` (all drives of one backup); ``feature`` (fleecing as
a feature of a backup run, handed in by the job layer); ``cleanup`` (leftovers of crashed
runs); ``bench`` (``python -m fleecing.bench``, the tuning tool).

A library with a boundary (``tests/test_layering.py``): it uses :mod:`qmpbackup.qemu`,
:mod:`qmpbackup.nbd` and the journal, never :mod:`qmpbackup.backup` or the CLI; only the
benchmark drives the real block jobs.
"""
