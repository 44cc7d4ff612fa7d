"""Fleecing storages: where copy-before-write keeps old data during a live backup.

Modules, bottom up: ``errors``; ``runner`` (external tools, injectable); ``probe`` (free
space, thin, discard, rotational); ``storage`` (storage.cfg sections we can fleece on, the
space rule); ``images`` (``vm-<vmid>-fleece-<n>`` on dir/lvmthin/zfspool); ``graph`` (one
drive's copy-before-write + snapshot-access graph, journal undo steps); ``nbd_client`` and
``reclaim`` (giving space back: ``discard-source`` or TRIMs through QEMU's NBD server);
``drives`` (all drives of one backup: what the engine calls); ``cleanup`` (leftovers of
crashed runs); ``bench`` (``python -m fleecing.bench``).
"""
